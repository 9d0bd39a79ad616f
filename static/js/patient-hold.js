// The patient page's hold panel: holding a slot, the countdown, Confirm and
// Release. The hold is state (hold.js); this sends the commands and draws the
// panel. Nothing is sent while the page is offline: a press then is explained
// in the panel and waits for the patient to press again once the page is live.
// Thirty seconds before the hold lapses the panel warns once (role=alert), and
// the countdown turns urgent; a hold that lapses is a warning naming the doctor
// and the day, with "Book again".

import { countdown, patientWhen } from "./format.js";
import { holdLeft } from "./hold.js";
import { ServerError } from "./connection.js";
import { showNotice, showWarning } from "./ui.js";

// When the countdown warns (once per hold) and when it looks urgent.
const WARN_MS = 30_000;
const URGENT_MS = 10_000;

const $ = (selector) => document.querySelector(selector);

/**
 * `page`: {conn, intentions, zone, doctors, hold, fail, doctorZone, bookAgain}.
 * `rerenderSlot(id)` redraws a slot the hold moved onto or off;
 * `remember(appointment)` files a reply's appointment under my appointments;
 * `resync()` fetches them afresh; `confirmed(appointment)` shows the booking.
 */
export function holdPanel(page, { rerenderSlot, remember, resync, confirmed }) {
  const { hold: state, intentions, zone } = page;
  let timer = null;
  const warned = new Set(); // hold ids whose lapse was already warned of
  let offlinePress = false; // Confirm was pressed offline: say so until it is pressed again

  /** When a patient reads a hold or an appointment: their time (and the clinic's). */
  const when = (appointment) => patientWhen(appointment.start, zone, page.doctorZone(appointment.doctor_id));

  async function take(slotId) {
    if (!page.conn.ready) {
      page.fail(new ServerError("offline")); // nothing is kept to be sent later
      return;
    }
    const intention = `hold:${slotId}`;
    const button = document.querySelector(`.slot[data-slot-id="${slotId}"]`);
    button?.setAttribute("aria-busy", "true");
    try {
      const { body } = await page.conn.request(
        "hold",
        { slot_id: slotId, idempotency_key: intentions.key(intention) },
        { retry: true },
      );
      intentions.settle(intention);
      const previous = state.current;
      remember(body.appointment);
      show(body.appointment);
      $("#confirm-hold").focus();
      // One hold at a time on this page: holding another slot gives the old one back.
      if (previous && previous.id !== body.appointment.id) release(previous, { quiet: true });
    } catch (error) {
      intentions.settle(intention, error);
      page.fail(error);
    } finally {
      button?.removeAttribute("aria-busy");
    }
  }

  /** Show a pending appointment as the hold, with its countdown running. */
  function show(appointment) {
    const another = !state.is(appointment.id); // else the same hold again (its event, then the reply)
    const previousSlot = state.set(appointment);
    const panel = $("[data-testid=hold]");
    panel.hidden = false;
    document.body.classList.add("holding");
    if (another) {
      offlinePress = false;
      note("");
    }
    renderText();
    setBusy(false);
    clearInterval(timer);
    timer = setInterval(tick, 1000);
    tick();
    rerenderSlot(previousSlot);
    rerenderSlot(appointment.slot_id);
  }

  function renderText() {
    const hold = state.current;
    if (!hold) return;
    $("#hold-what").textContent = `${page.doctors.name(hold.doctor_id)} · ${when(hold)}`;
  }

  /** The panel's one line of news (offline, the hold about to lapse); "" hides it. */
  function note(text) {
    const line = $("#hold-note");
    line.textContent = text;
    line.hidden = !text;
  }

  /** The connection changed: a Confirm pressed offline can be pressed again now. */
  function connectionChanged(online) {
    if (!state.current || !offlinePress) return;
    note(
      online
        ? "You are back online. Your booking was not sent: press Confirm booking to book this time."
        : "You are offline, so your booking was not sent. Your hold keeps running: press Confirm booking again once you are back online.",
    );
  }

  function clear() {
    const slotId = state.clear();
    $("#visit-reason").value = "";
    clearInterval(timer);
    const panel = $("[data-testid=hold]");
    const hadFocus = panel.contains(document.activeElement);
    panel.hidden = true;
    document.body.classList.remove("holding");
    rerenderSlot(slotId);
    // Hiding the focused Confirm/Release button would drop a keyboard user on
    // <body>, back at the top of the page: keep them near the calendar instead.
    if (hadFocus) {
      const slot = document.querySelector(`.slot[data-slot-id="${slotId}"]:enabled`);
      (slot ?? $("#main")).focus({ preventScroll: true });
    }
  }

  function tick() {
    const hold = state.current;
    if (!hold) return;
    const left = holdLeft(hold);
    $("[data-testid=countdown]").textContent = countdown(left);
    const panel = $("[data-testid=hold]");
    panel.dataset.urgency = left <= URGENT_MS ? "now" : left <= WARN_MS ? "soon" : "";
    if (left > 0 && left <= WARN_MS && !warned.has(hold.id)) {
      warned.add(hold.id);
      if (!offlinePress) note("Less than 30 seconds left on your hold. Confirm now to keep this time.");
    }
    if (state.ranOut(hold, left)) expired(hold);
  }

  /** A hold ran out: hide it if shown, and say so once. */
  function expired(hold) {
    if (state.is(hold.id)) clear();
    if (!state.announce(hold.id)) return;
    showWarning(
      "hold_expired",
      `Your hold with ${page.doctors.name(hold.doctor_id)} on ${when(hold)} ran out before it was confirmed, so it is not booked.`,
      { label: "Book again", run: () => page.bookAgain(hold) },
    );
  }

  function setBusy(busy) {
    const panel = $("[data-testid=hold]");
    // Chromium blurs a focused button when it is disabled: keep the keyboard in
    // the panel (focusable for this) so clear() knows where it was.
    if (busy && panel.contains(document.activeElement)) panel.focus({ preventScroll: true });
    for (const button of panel.querySelectorAll("button")) button.disabled = busy;
  }

  async function confirm() {
    const hold = state.current;
    if (!hold) return;
    if (!page.conn.ready) {
      // Sent by itself on reconnecting, it could book a time the patient has since
      // given up on; they press again once the page is live.
      offlinePress = true;
      connectionChanged(false);
      return;
    }
    offlinePress = false;
    note("");
    const intention = `book:${hold.id}`;
    // Told to the clinic with the booking (what staff see, never other patients).
    const reason = $("#visit-reason").value.trim() || null;
    setBusy(true);
    state.confirming = hold.id;
    try {
      const { body } = await page.conn.request(
        "book",
        { hold_id: hold.id, idempotency_key: intentions.key(intention), visit_reason: reason },
        { retry: true },
      );
      intentions.settle(intention);
      remember(body.appointment);
      if (state.is(hold.id)) clear();
      confirmed(body.appointment);
    } catch (error) {
      intentions.settle(intention, error);
      setBusy(false);
      if (["hold_expired", "invalid_transition", "not_found", "not_holder"].includes(error.code)) {
        state.announce(hold.id); // the error says it already
        if (state.is(hold.id)) clear();
        resync().catch(() => {});
      }
      page.fail(error);
    } finally {
      if (state.confirming === hold.id) state.confirming = null;
    }
  }

  async function release(hold, { quiet = false } = {}) {
    const intention = `release:${hold.id}`;
    if (!quiet) setBusy(true);
    try {
      await page.conn.request(
        "release",
        { appointment_id: hold.id, idempotency_key: intentions.key(intention) },
        { retry: true },
      );
      intentions.settle(intention);
      if (state.is(hold.id)) clear();
      if (!quiet) showNotice("released", `Released ${when(hold)}; the slot is free again.`);
    } catch (error) {
      intentions.settle(intention, error);
      if (state.is(hold.id)) setBusy(false);
      if (error.code === "hold_expired") expired(hold);
      else if (!quiet) page.fail(error);
    }
  }

  /** The Release button: give back the hold shown. */
  function releaseShown() {
    if (state.current && !page.conn.ready) {
      page.fail(new ServerError("offline"));
      return null;
    }
    return state.current && release(state.current);
  }

  return { take, show, renderText, clear, expired, confirm, releaseShown, connectionChanged };
}
