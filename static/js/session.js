// Who the page acts for. In production the host application opens the page
// with `#token=<jwt>` (or later sends one with postMessage); in demo mode the
// page offers a sign-in form that asks the server for a development token.
// The token lives in sessionStorage so that it survives reloads and the move
// between `/` and `/doctor`, but not the closing of the tab.

import { learnServerTime } from "./clock.js";

const KEY = "slotcast.token";

/**
 * Take a token from the URL fragment (then hide it from the address bar), else from storage.
 *
 * A link may be for someone else than the person this tab is signed in as (a
 * link forwarded by mistake, or planted to make them act as another patient):
 * it never replaces a live identity silently. `confirmSwitch(current, offered)`
 * (claims of each) asks first, and resolves to whether to switch.
 */
export async function takeToken(confirmSwitch) {
  const match = location.hash.match(/(?:^#|&)token=([^&]+)/);
  if (match) {
    // Keep the token out of the history and out of any link the user copies.
    history.replaceState(null, "", location.pathname + location.search);
    const offered = decodeURIComponent(match[1]);
    const current = readClaims(sessionStorage.getItem(KEY) ?? "");
    const next = readClaims(offered);
    const live = current && !(current.exp && current.exp * 1000 <= Date.now());
    const same = live && next && next.sub === current.sub && next.role === current.role;
    if (!live || same) sessionStorage.setItem(KEY, offered);
    else if (next && (await confirmSwitch(current, next))) sessionStorage.setItem(KEY, offered);
  }
  return sessionStorage.getItem(KEY);
}

export function storeToken(token) {
  sessionStorage.setItem(KEY, token);
}

export function clearToken() {
  sessionStorage.removeItem(KEY);
}

/**
 * The token's claims ({sub, role, exp}), read without checking the signature:
 * only to pick the right page before the server has answered `auth`. The
 * server alone decides what the token allows.
 */
export function readClaims(token) {
  try {
    const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const json = new TextDecoder().decode(Uint8Array.from(atob(payload), (c) => c.charCodeAt(0)));
    const claims = JSON.parse(json);
    return typeof claims.sub === "string" && typeof claims.role === "string" ? claims : null;
  } catch {
    return null;
  }
}

/** Which page serves a role. */
export function pageFor(role) {
  return { patient: "/", admin: "/clinic" }[role] ?? "/doctor";
}

/**
 * The origins allowed to hand this page a token by postMessage besides its
 * own: `<meta name="slotcast-host-origins" content="https://app.clinic.example">`
 * (space-separated), which the server fills in from SLOTCAST_HOST_ORIGINS.
 */
function hostOrigins() {
  const meta = document.querySelector('meta[name="slotcast-host-origins"]');
  return new Set((meta?.content ?? "").split(/\s+/).filter(Boolean));
}

/**
 * Accept fresh tokens from the host application: this page's own origin or a
 * configured host origin. Being the parent frame or the opener is not enough:
 * any site can frame this page or open it, and a token it slipped in would
 * make the visitor book, cancel and read appointments as someone else.
 */
export function listenForTokens(onToken) {
  const allowed = hostOrigins();
  window.addEventListener("message", (event) => {
    const data = event.data;
    if (!data || data.type !== "slotcast:token" || typeof data.token !== "string" || !data.token) return;
    if (event.origin !== location.origin && !allowed.has(event.origin)) return;
    storeToken(data.token);
    onToken(data.token);
  });
}

/**
 * Whether the server runs in demo mode: `<meta name="slotcast-demo" content="on">`,
 * which the server fills in. A production page never asks a demo endpoint.
 */
function demoMode() {
  return document.querySelector('meta[name="slotcast-demo"]')?.content === "on";
}

/** The demo identities, or null when the server is not in demo mode. */
export async function loadDemo() {
  // Every page load asks the server something: set the clock by its Date header.
  const url = demoMode() ? "/api/demo" : "/healthz";
  try {
    const sentAt = Date.now();
    const response = await fetch(url, { headers: { Accept: "application/json" }, cache: "no-store" });
    learnServerTime(response, sentAt, Date.now());
    if (url !== "/api/demo" || !response.ok) return null;
    const demo = await response.json();
    return { patients: demo.patients ?? [], doctors: demo.doctors ?? [] };
  } catch {
    return null;
  }
}

/** Ask the demo server for a token; throws an Error with `code` when refused. */
export async function demoToken(role, subject) {
  let response;
  try {
    response = await fetch("/api/demo/token", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify({ role, subject }),
    });
  } catch {
    throw Object.assign(new Error("network"), { code: "offline" });
  }
  const reply = await response.json().catch(() => ({}));
  if (!response.ok) throw Object.assign(new Error("refused"), { code: reply.error?.code ?? "internal" });
  return reply.token;
}

/** Display name of a subject, from the demo list when it knows it. */
export function displayName(demo, role, subject) {
  if (role === "patient") return demo?.patients.find((p) => p.subject === subject)?.name ?? subject;
  if (role === "doctor") return demo?.doctors.find((d) => String(d.id) === subject)?.name ?? `Doctor ${subject}`;
  if (role === "admin" && subject === DEMO_DESK) return "Front desk";
  return subject;
}

const SIGNED_IN_KEY = "slotcast.signedIn";
/** The demo's one staff identity (server/signin.py): an admin, for the front desk. */
const DEMO_DESK = "desk";

/** Whether this page load follows a sign-in on the form (asked once: the answer is used up). */
export function justSignedIn() {
  const yes = sessionStorage.getItem(SIGNED_IN_KEY) === "1";
  sessionStorage.removeItem(SIGNED_IN_KEY);
  return yes;
}

/**
 * Fill the static sign-in form (`form[data-testid=signin]`) with the demo
 * identities and sign in on submit: store the token, then go to the page for
 * that role (reloading this one when it is already the right page).
 */
export function setUpSignin(form, demo, onError) {
  const select = form.querySelector("select");
  select.replaceChildren();
  const groups = [
    ["Patients", demo.patients.map((p) => [`patient:${p.subject}`, `${p.name} (patient)`])],
    ["Doctors", demo.doctors.map((d) => [`doctor:${d.id}`, `${d.name} — ${d.specialty} (doctor)`])],
    ["Clinic staff", [[`admin:${DEMO_DESK}`, "Front desk (admin)"]]],
  ];
  for (const [label, options] of groups) {
    const group = document.createElement("optgroup");
    group.label = label;
    for (const [value, text] of options) group.append(new Option(text, value));
    select.append(group);
  }
  // Preselect someone this page is for: a doctor on /doctor, a patient on /.
  const wanted = { [pageFor("patient")]: "patient:", [pageFor("admin")]: "admin:" }[location.pathname] ?? "doctor:";
  const first = [...select.options].find((option) => option.value.startsWith(wanted));
  if (first) select.value = first.value;
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const [role, subject] = select.value.split(/:(.*)/s);
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    try {
      storeToken(await demoToken(role, subject));
      sessionStorage.setItem(SIGNED_IN_KEY, "1"); // the next page puts the keyboard on its heading
      const target = pageFor(role);
      if (location.pathname === target) location.reload();
      else location.assign(target);
    } catch (error) {
      onError(error.code);
      button.disabled = false;
    }
  });
}
