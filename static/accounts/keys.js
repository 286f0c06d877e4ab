// My API keys: copy a new key to the clipboard, and ask before revoking one.
for (const button of document.querySelectorAll("[data-copy]")) {
  button.addEventListener("click", async () => {
    const text = document.getElementById(button.dataset.copy).textContent;
    try {
      await navigator.clipboard.writeText(text);
      button.textContent = "Copied";
    } catch (_) {
      // No clipboard (plain http, an old browser): the key is selectable text, so select it instead.
      window.getSelection().selectAllChildren(document.getElementById(button.dataset.copy));
      button.textContent = "Selected: copy it";
    }
  });
}

for (const form of document.querySelectorAll(".revoke-form")) {
  form.addEventListener("submit", (event) => {
    const name = form.closest("tr").querySelector("td").textContent;
    if (!window.confirm(`Revoke the key “${name}”? Scripts using it stop working.`)) event.preventDefault();
  });
}
