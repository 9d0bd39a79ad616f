// What both pages do before their own work starts: find the token, send a
// visitor with the wrong role to the right page, show the sign-in form when
// there is no token, and otherwise open the connection with the header
// (who is signed in, Sign out, connection indicator) wired up.

import { Connection } from "./connection.js";
import {
  clearToken,
  displayName,
  listenForTokens,
  loadDemo,
  pageFor,
  readClaims,
  setUpSignin,
  takeToken,
} from "./session.js";
import { bindIndicator, showError } from "./ui.js";

function showSignin(demo) {
  document.getElementById("app-view").hidden = true;
  document.querySelector(".who").hidden = true;
  document.querySelector("[data-testid=connection]").hidden = true;
  document.getElementById("signin-view").hidden = false;
  const form = document.querySelector("form[data-testid=signin]");
  const noDemo = document.getElementById("no-demo");
  form.hidden = !demo;
  noDemo.hidden = Boolean(demo);
  if (demo && !form.dataset.ready) {
    form.dataset.ready = "true";
    setUpSignin(form, demo, showError);
  }
}

/**
 * Start a page for `pageRole` ("patient" or "doctor"). Resolves to
 * {conn, claims, demo} once the connection is created (not yet connected: the
 * page sets conn.onReady and its push handlers, then calls conn.start()), or
 * to null when the page shows the sign-in form or redirects instead.
 */
export async function boot(pageRole) {
  const token = takeToken();
  const demo = await loadDemo();
  let claims = token ? readClaims(token) : null;
  if (token && !claims) {
    clearToken();
    showError("token_invalid");
  } else if (claims && claims.exp && claims.exp * 1000 <= Date.now()) {
    clearToken();
    showError("token_expired");
    claims = null;
  }
  if (claims && (pageRole === "patient") !== (claims.role === "patient")) {
    location.replace(pageFor(claims.role)); // e.g. a doctor's token opened on the patient page
    return null;
  }

  let conn = null;
  listenForTokens((fresh) => {
    const next = readClaims(fresh);
    // Same person, fresh token: re-authenticate in place. Anyone else: start over.
    if (conn && next && next.sub === claims.sub && next.role === claims.role) conn.setToken(fresh);
    else location.reload();
  });
  if (!claims) {
    showSignin(demo);
    return null;
  }

  document.getElementById("signin-view").hidden = true;
  document.getElementById("app-view").hidden = false;
  document.querySelector(".who").hidden = false;
  document.querySelector("[data-testid=whoami]").textContent = displayName(demo, claims.role, claims.sub);
  document.getElementById("signout").addEventListener("click", () => {
    clearToken();
    location.reload();
  });

  conn = new Connection({ token: sessionStorage.getItem("slotcast.token") ?? token });
  bindIndicator(conn);
  conn.addEventListener("autherror", (event) => {
    conn.stop();
    clearToken();
    showError(event.detail.code);
    showSignin(demo);
  });
  return { conn, claims, demo };
}
