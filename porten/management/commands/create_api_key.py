"""manage.py create_api_key NAME [--role operator]: prints the raw key once, as the last line."""
from django.core.management.base import BaseCommand, CommandError

from porten.keys import api_key_create
from porten.models import KeyRole


class Command(BaseCommand):
    help = "Create an API key for /v1 (and /api/ with --role operator) and print it (the last line of output is the key)."

    def add_arguments(self, parser):
        parser.add_argument("name", help="who or what the key is for")
        parser.add_argument("--role", choices=KeyRole.values, default=KeyRole.USER,
                            help="operator: may also use the operator API (/api/)")

    def handle(self, *args, name: str, role: str, **options):
        try:
            api_key, raw_key = api_key_create(name=name, role=role)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"Created API key '{api_key.name}' ({api_key.prefix}…). It is shown only once:")
        self.stdout.write(raw_key)
