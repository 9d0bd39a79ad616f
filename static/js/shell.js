// What both pages do before their own work starts: find the token, send a
// visitor with the wrong role to the right page, show the sign-in form when
// there is no token, and otherwise open the connection with the header
// (who is signed in, Sign out, connection indicator) wired up.

import { serverNow } from "./clock.js";
import { Connection } from "./connection.js";
import {
  clearToken,
  demoToken,
  displayName,
  justSignedIn,
  listenForTokens,
  loadDemo,
  pageFor,
  readClaims,
  setUpSignin,
  storeToken,
  takeToken,
} from "./session.js";
import { askToSwitch, bindIndicator, showError } from "./ui.js";

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
 * Demo tokens expire like real ones. A minute before, fetch a new one for the
 * same identity and present it on the live connection, so a demo left open
 * keeps working. (In production the host application sends fresh tokens.)
 * Timers sleep with the laptop, so the returned renew() is also what the page
 * calls when the token did run out. Resolves to whether a token was presented.
 */
function keepDemoTokenFresh(conn, claims) {
  let timer = null;
  let renewing = null;
  const schedule = (exp) => {
    clearTimeout(timer);
    if (!exp) return;
    const refreshIn = Math.max(0, exp * 1000 - serverNow() - 60_000);
    if (refreshIn > 2 ** 31 - 1) return; // beyond what setTimeout can wait
    timer = setTimeout(renew, refreshIn);
  };
  const renew = () => {
    renewing ??= (async () => {
      try {
        const token = await demoToken(claims.role, claims.sub);
        if (conn.stopped) return false; // signed out meanwhile: do not sign back in
        storeToken(token);
        schedule(readClaims(token)?.exp);
        await conn.setToken(token);
        return true;
      } catch {
        return false; // the caller says the session ended
      } finally {
        renewing = null;
      }
    })();
    return renewing;
  };
  schedule(claims.exp);
  return renew;
}

/**
 * Start a page for `pageRole` ("patient" or "doctor"). Resolves to
 * {conn, claims, demo, signedIn} once the connection is created (not yet
 * connected: the page sets conn.onReady and its push handlers, then calls
 * conn.start()), or to null when the page shows the sign-in form or redirects
 * instead. `signedIn`: this load follows the sign-in form, so the page puts the
 * keyboard on its main heading rather than leaving it on <body>.
 */
export async function boot(pageRole) {
  const demo = await loadDemo();
  const token = await takeToken((current, offered) =>
    askToSwitch(displayName(demo, current.role, current.sub), displayName(demo, offered.role, offered.sub)),
  );
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
    // Same person, fresh token: re-authenticate in place (re-joining the rooms
    // an expiry left). Anyone else, or a page that gave up: start over.
    if (conn && !conn.stopped && next && next.sub === claims.sub && next.role === claims.role) conn.setToken(fresh);
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

  conn = new Connection({ token });
  bindIndicator(conn);
  const renew = demo ? keepDemoTokenFresh(conn, claims) : async () => false;
  // The token ran out on the live connection: the private rooms are gone.
  // Demo: fetch a new one and carry on. Production: say so; the host
  // application's next token (postMessage) re-joins them.
  conn.addEventListener("tokenexpired", async () => {
    if (!(await renew())) showError("token_expired");
  });
  conn.addEventListener("autherror", async (event) => {
    if (event.detail.code === "token_expired" && (await renew())) return;
    conn.stop();
    clearToken();
    showError(event.detail.code);
    showSignin(demo);
  });
  return { conn, claims, demo, signedIn: justSignedIn() };
}
