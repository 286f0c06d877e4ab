"""A person's own pages: sign in and out (Django's auth views), and My API keys with their usage."""
from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.contrib.auth.views import LoginView, LogoutView
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_http_methods, require_POST

from catalog.selectors import offered_models

from .forms import KeyCreateForm
from .keys import api_key_create_own, api_key_revoke
from .scopes import policy_for
from .selectors import models_allowed, own_key, own_key_rows, own_usage

sign_in = LoginView.as_view(template_name="accounts/login.html")
sign_out = LogoutView.as_view()  # POST only (Django 5); LOGOUT_REDIRECT_URL says where to next


@login_required
@never_cache  # the answer to a POST holds a raw key: no browser or proxy keeps a copy
@require_http_methods(["GET", "POST"])
def keys_page(request) -> HttpResponse:
    """GET: the person's keys, a form for a new one, their usage. POST: make a key and show it, once."""
    user = request.user
    policy = policy_for(user)
    allowed = models_allowed(policy=policy)
    offered = set(offered_models().values_list("model_id", flat=True))

    def blank_form() -> KeyCreateForm:
        return KeyCreateForm(policy=policy, allowed=allowed, offered=offered)

    form, created, raw_key, status = blank_form(), None, None, 200
    if request.method == "POST":
        form = KeyCreateForm(request.POST, policy=policy, allowed=allowed, offered=offered)
        if form.is_valid():
            data = form.cleaned_data
            try:
                created, raw_key = api_key_create_own(
                    user=user, name=data["name"], allowed_models=data["models"], expires_at=form.expires_at(),
                    rpm_limit=data["rpm_limit"], tpm_limit=data["tpm_limit"], max_concurrent=data["max_concurrent"])
            except ValueError as exc:  # OutsidePolicy, or a key the service refuses (an expiry gone by)
                form.add_error(None, str(exc))
            else:
                form = blank_form()
        if form.errors:
            status = 400
    keys = own_key_rows(user=user)
    return render(request, "accounts/keys.html", {
        "username": user.get_username(), "staff": user.is_staff, "form": form, "keys": keys,
        "created": created, "raw_key": raw_key, "policy": policy, "allowed": allowed,
        "active_count": sum(1 for k in keys if k.key.is_active), "usage": own_usage(user=user),
    }, status=status)


@login_required
@require_POST
def key_revoke(request, key_id: int) -> HttpResponse:
    api_key = own_key(user=request.user, key_id=key_id)
    if api_key is None:  # someone else's key reads as no key at all
        raise Http404("There is no such key of yours.")
    api_key_revoke(api_key=api_key)
    messages.success(request, f"Revoked {api_key.name} ({api_key.prefix}…); it stops working within seconds.")
    return redirect("keys")
