// DOM helpers every part of the page uses: lookups by id, building elements, the notice line.

export const $ = (id) => document.getElementById(id);

export function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

export function showNotice(text, linkText, href) {
  const notice = $("notice");
  notice.textContent = text;
  if (linkText) {
    notice.append(" ");
    const link = el("a", "", linkText);
    link.href = href;
    notice.append(link);
  }
  notice.hidden = false;
}

export function showSessionEnded() {
  showNotice("Your session has ended.", "Sign in again", `/accounts/login/?next=${encodeURIComponent(location.pathname)}`);
}
