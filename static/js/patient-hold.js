// The patient page's hold panel: holding a slot, the countdown, Confirm and
// Release. The hold is state (hold.js); this sends the commands and draws the
// panel.

import { countdown, dateKey, dayLong, shortDateTime, timeHM } from "./format.js";
import { holdLeft } from "./hold.js";
import { showNotice } from "./ui.js";

const $ = (selector) => document.querySelector(selector);

/**
 * `page`: {conn, intentions, zone, doctors, hold, fail}. `rerenderSlot(id)`
 * redraws a slot the hold moved onto or off; `remember(appointment)` files a
 * reply's appointment under my appointments; `resync()` fetches them afresh.
 */
export function holdPanel(page, { rerenderSlot, remember, resync }) {
  const { hold: state, intentions, zone } = page;
  let timer = null;

  async function take(slotId) {
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
    const previousSlot = state.set(appointment);
    const panel = $("[data-testid=hold]");
    panel.hidden = false;
    document.body.classList.add("holding");
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
    $("#hold-what").textContent =
      `${page.doctors.name(hold.doctor_id)} · ${dayLong(dateKey(hold.start, zone))}, ${timeHM(hold.start, zone)}`;
  }

  function clear() {
    const slotId = state.clear();
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
    if (state.ranOut(hold, left)) expired(hold);
  }

  /** A hold ran out: hide it if shown, and say so once. */
  function expired(hold) {
    if (state.is(hold.id)) clear();
    if (!state.announce(hold.id)) return;
    showNotice("hold_expired", `Your hold on ${timeHM(hold.start, zone)} expired; the slot is free again.`);
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
    const intention = `book:${hold.id}`;
    setBusy(true);
    state.confirming = hold.id;
    try {
      const { body } = await page.conn.request(
        "book",
        { hold_id: hold.id, idempotency_key: intentions.key(intention) },
        { retry: true },
      );
      intentions.settle(intention);
      remember(body.appointment);
      if (state.is(hold.id)) clear();
      const appointment = body.appointment;
      showNotice("booked", `Booked: ${shortDateTime(appointment.start, zone)} with ${page.doctors.name(appointment.doctor_id)}`);
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
      if (!quiet) showNotice("released", `Released ${timeHM(hold.start, zone)}; the slot is free again.`);
    } catch (error) {
      intentions.settle(intention, error);
      if (state.is(hold.id)) setBusy(false);
      if (error.code === "hold_expired") expired(hold);
      else if (!quiet) page.fail(error);
    }
  }

  /** The Release button: give back the hold shown. */
  function releaseShown() {
    return state.current && release(state.current);
  }

  return { take, show, renderText, clear, expired, confirm, releaseShown };
}
