"""The form a person fills in to make an API key of their own: its shape only; the access policy is
porten.keys' to check."""
from __future__ import annotations

from datetime import datetime, time, timedelta, timezone as dt_timezone

from django import forms

from catalog.models import CatalogModel

from .models import AccessPolicy

MOST_STORED = 2**31 - 1  # what a PositiveIntegerField holds on every database

LIMITS = ("rpm_limit", "tpm_limit", "max_concurrent")  # a key's and a policy's fields alike


class OfferedModelsField(forms.MultipleChoiceField):
    """Ticks among the models the person may pick; any offered id passes here, so that asking for one
    the policy does not allow gets the policy's own message rather than a generic one."""

    def __init__(self, *, offered: set[str], **kwargs) -> None:
        super().__init__(**kwargs)
        self.offered = offered

    def valid_value(self, value) -> bool:
        return value in self.offered


class KeyCreateForm(forms.Form):
    name = forms.CharField(max_length=100, strip=True, widget=forms.TextInput(
        attrs={"placeholder": "e.g. laptop, notebook, CI", "autocomplete": "off"}))
    models = OfferedModelsField(
        offered=set(), required=False, widget=forms.CheckboxSelectMultiple,
        error_messages={"invalid_choice": "%(value)s is not an offered model."})
    expires_on = forms.DateField(
        required=False, label="Expires after", widget=forms.DateInput(attrs={"type": "date"}),
        help_text="The key works until the end of this day (UTC). Empty: it does not expire.")
    rpm_limit = forms.IntegerField(required=False, min_value=1, max_value=MOST_STORED, label="Requests per minute")
    tpm_limit = forms.IntegerField(required=False, min_value=1, max_value=MOST_STORED, label="Tokens per minute")
    max_concurrent = forms.IntegerField(required=False, min_value=1, max_value=MOST_STORED, label="Concurrent requests")

    def __init__(self, *args, policy: AccessPolicy, allowed: list[CatalogModel], offered: set[str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fields["models"].choices = [(m.model_id, m.display_name or m.model_id) for m in allowed]
        self.fields["models"].offered = offered
        self.fields["models"].help_text = ("None ticked: every model you may use." if allowed
                                           else "No model is offered to you yet.")
        for field in LIMITS:
            most = getattr(policy, field)
            widget = self.fields[field].widget
            if most is None:
                widget.attrs["placeholder"] = "no limit"
                self.fields[field].help_text = "Empty: no limit."
            else:
                widget.attrs.update({"max": str(most), "placeholder": f"at most {most}"})
                self.fields[field].help_text = f"At most {most}; empty: {most}."

    def expires_at(self) -> datetime | None:
        """The end of the chosen day, UTC."""
        day = self.cleaned_data.get("expires_on")
        if day is None:
            return None
        return datetime.combine(day + timedelta(days=1), time.min, tzinfo=dt_timezone.utc)
