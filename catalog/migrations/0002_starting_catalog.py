"""Load the starting catalog (only entries that are not there yet: operators' edits win)."""
from django.db import migrations


def load_starting_catalog(apps, schema_editor):
    from catalog.starting_catalog import STARTING_CATALOG

    CatalogModel = apps.get_model("catalog", "CatalogModel")
    for entry in STARTING_CATALOG:
        fields = dict(entry)
        CatalogModel.objects.get_or_create(model_id=fields.pop("model_id"), defaults=fields)


class Migration(migrations.Migration):
    dependencies = [("catalog", "0001_initial")]
    operations = [migrations.RunPython(load_starting_catalog, migrations.RunPython.noop)]
