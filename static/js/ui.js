// Small DOM helpers shared by both pages. Server text only ever reaches the
// page through textContent and attributes (never innerHTML), so a patient
// named "<img onerror=...>" is just a strange name.

import { errorText } from "./messages.js";

/**
 * Build an element: el("button", {class: "slot", dataset: {slotId: 7}, onclick: fn}, "09:00").
 * Keys starting with "on" add listeners; `dataset` fills data-*; other keys
 * become attributes (false/null/undefined ones are left out).
 */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === false || value === null || value === undefined) continue;
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  node.append(...children.filter((child) => child !== null && child !== undefined && child !== false));
  return node;
}

export const reducedMotion = () => window.matchMedia("(prefers-reduced-motion: reduce)").matches;

// ---- messages -------------------------------------------------------------------
// One message at a time: a newer one replaces the older, so the latest outcome
// is what the person reads (and what a screen reader announces).

const MESSAGE_MS = 8000;
let messageTimer = null;

function showMessageElement(kind, code, text, action = null) {
  const area = document.getElementById("messages");
  clearTimeout(messageTimer);
  const dismiss = el("button", { type: "button", class: "btn btn-quiet dismiss", onclick: () => box.remove() }, "Dismiss");
  const act = action
    ? el("button", { type: "button", class: "btn btn-small", onclick: () => (box.remove(), action.run()) }, action.label)
    : null;
  const box = el(
    "div",
    { class: `message message-${kind}`, "data-testid": "message", role: kind === "error" ? "alert" : "status", dataset: { code } },
    el("p", {}, text),
    act,
    dismiss,
  );
  area.replaceChildren(box);
  // A message that offers something to do stays until it is used or dismissed: a
  // reader who is slower than eight seconds must still be able to reach it.
  if (!action) messageTimer = setTimeout(() => box.remove(), MESSAGE_MS);
}

/** An error for a code from protocol/errors.py (or "offline"). */
export function showError(code) {
  showMessageElement("error", code, errorText(code));
}

/** A notice (booked, hold expired, ...) with its own code and text. */
export function showNotice(code, text) {
  showMessageElement("notice", code, text);
}

/**
 * Something the person did not want happened (their hold ran out, the clinic
 * cancelled): styled as a warning, not as a success, with an optional action
 * ({label, run}) such as "Book again".
 */
export function showWarning(code, text, action = null) {
  showMessageElement("warning", code, text, action);
}

// ---- connection indicator ------------------------------------------------------

const STATE_TEXT = {
  connecting: "Connecting…",
  online: "Live",
  recovering: "Not live — retrying",
  offline: "Offline — reconnecting",
};

export function bindIndicator(conn) {
  const indicator = document.querySelector("[data-testid=connection]");
  const render = (state) => {
    indicator.dataset.state = state;
    indicator.querySelector(".connection-text").textContent = STATE_TEXT[state];
  };
  indicator.hidden = false;
  render(conn.state);
  conn.addEventListener("state", (event) => render(event.detail));
}

// ---- switching identity -------------------------------------------------------------

/**
 * Ask whether a `#token=` link for `offered` may replace `current` (display
 * names) in this tab. A modal <dialog>: focus moves into it (to the safe
 * choice), Tab stays inside, Escape keeps the current sign-in. Resolves to
 * true only when the person chose to switch.
 */
export function askToSwitch(current, offered) {
  const stay = el("button", { type: "submit", class: "btn", value: "stay", autofocus: true }, `Stay signed in as ${current}`);
  const dialog = el(
    "dialog",
    { class: "switch-dialog card", "data-testid": "switch-identity", "aria-labelledby": "switch-h", "aria-describedby": "switch-p" },
    el("h2", { id: "switch-h" }, "Switch who is signed in?"),
    el(
      "p",
      { id: "switch-p" },
      `This tab is signed in as ${current}. The link you opened would sign it in as ${offered} instead.`,
    ),
    el(
      "form",
      { method: "dialog", class: "switch-actions" },
      stay,
      el("button", { type: "submit", class: "btn btn-primary", value: "switch" }, `Sign in as ${offered}`),
    ),
  );
  document.body.append(dialog);
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      dialog.remove();
      resolve(dialog.returnValue === "switch");
    });
    dialog.showModal();
    stay.focus();
  });
}

/**
 * The rows of a live list, kept by slot and rebuilt only when what they show changed
 * (`signature`), so that a keyboard user's focus and an open form survive updates to
 * other rows. A rebuilt row that had the focus hands it to its first usable button
 * (else to itself); a rebuilt row flashes unless motion is reduced. Returns the rows
 * in order, for the caller to place.
 */
export function keyedRows(list, testId, rows, signatureOf, render) {
  const focused = document.activeElement?.closest?.(`[data-testid=${testId}]`);
  return rows.map((row) => {
    const signature = signatureOf(row);
    let item = list.querySelector(`[data-testid=${testId}][data-slot-id="${row.slot.id}"]`);
    if (!item || item.dataset.signature !== signature) {
      const fresh = render(row);
      fresh.dataset.signature = signature;
      if (item && !reducedMotion()) fresh.classList.add("fresh");
      if (item && item === focused) queueMicrotask(() => (fresh.querySelector("button:enabled") ?? fresh).focus());
      item = fresh;
    }
    return item;
  });
}
