// The patient page: find a doctor, see a week of their slots change live,
// hold one (with a countdown), confirm or release it, and follow one's own
// appointments. State lives in plain objects (the Calendar, the appointment
// map); render functions turn it into DOM. Every change from the server flows
// through the same few functions, whether it came from a reply, a push or a
// resume after reconnecting.

import { Calendar } from "./calendar.js";
import { serverNow } from "./clock.js";
import { Intentions, ServerError } from "./connection.js";
import { addDays, browserZone, countdown, dateKey, dayLong, dayMonth, shortDateTime, timeHM, utcOffset } from "./format.js";
import { errorCode, statusWords } from "./messages.js";
import { boot } from "./shell.js";
import { el, reducedMotion, showError, showNotice } from "./ui.js";

const zone = browserZone();
const TERMINAL = new Set(["cancelled", "fulfilled", "noshow"]);
const GONE = new Set(["busy", "busy-unavailable"]); // statuses that leave the patient's view
const LEAVE_MS = 600; // matches the CSS transition of a slot that goes
const DEFAULT_CANCEL_REASON = "Cancelled by patient";
// The countdown ends this much before the server's expiry: our idea of the
// server's clock is only good to about a second, and a confirm sent at "0:01"
// should still reach a live hold.
const HOLD_MARGIN_MS = 1000;

const intentions = new Intentions();
const $ = (selector) => document.querySelector(selector);

const state = {
  conn: null,
  doctors: new Map(), // id -> {id, name, specialty, timezone}
  doctorsLoaded: false,
  doctor: null, // the doctor whose week is shown
  today: dateKey(Date.now(), zone),
  weekStart: dateKey(Date.now(), zone), // the patient's local date the week starts on
  calendar: null, // Calendar of the shown doctor and week
  appointments: new Map(), // id -> appointment
  appointmentVersions: new Map(), // id -> doctor version of the last event applied
  cancelledByMe: new Set(), // appointment ids this patient cancelled here
  hold: null, // the pending appointment shown in the hold panel
  holdTimer: null,
  confirming: null, // id of the hold whose `book` is in flight
  expiredNotified: new Set(), // hold ids whose expiry was already announced
  searchSeq: 0,
};

function fail(error) {
  if (!(error instanceof ServerError)) console.error(error); // a bug of ours: keep it visible to developers
  showError(errorCode(error));
}

// ---- doctors ------------------------------------------------------------------------

const doctorName = (id) => state.doctors.get(id)?.name ?? `Doctor ${id}`;

/** Keep doctors we hear about; the hold and the appointments may have been waiting for a name. */
function remember(doctors) {
  const named = doctors.some((doctor) => !state.doctors.has(doctor.id));
  for (const doctor of doctors) state.doctors.set(doctor.id, doctor);
  if (named) {
    renderHoldText();
    renderAppointments(); // updates the names in place
  }
}

async function loadAllDoctors() {
  const { body } = await state.conn.request("search_doctors", { q: null, limit: 100 });
  remember(body.doctors);
  state.doctorsLoaded = true;
}

let searchTimer = null;
function onSearchInput() {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(() => search().catch(() => {}), 200);
}

async function search() {
  const q = $("#doctor-q").value.trim();
  const seq = ++state.searchSeq;
  try {
    const { body } = await state.conn.request("search_doctors", { q: q || null, limit: 20 });
    if (seq !== state.searchSeq) return; // a newer search was typed meanwhile
    remember(body.doctors);
    renderResults(body.doctors, q);
  } catch (error) {
    if (error.code !== "offline") fail(error);
  }
}

function renderResults(doctors, q) {
  const list = $("[data-testid=doctor-results]");
  if (doctors.length === 0) {
    list.replaceChildren(el("li", { class: "empty" }, `No doctor matches “${q}”.`));
    return;
  }
  list.replaceChildren(
    ...doctors.map((doctor) =>
      el(
        "li",
        {},
        el(
          "button",
          {
            type: "button",
            class: "doctor",
            "aria-label": `${doctor.name}, ${doctor.specialty}`,
            "aria-pressed": String(state.doctor?.id === doctor.id),
            dataset: { doctorId: doctor.id },
            onclick: () => {
              selectDoctor(doctor);
              // On a phone the week is below the list: bring it into view.
              if (matchMedia("(max-width: 959px)").matches) {
                $("#calendar-section").scrollIntoView({ behavior: reducedMotion() ? "auto" : "smooth" });
              }
            },
          },
          el("span", { class: "doctor-name" }, doctor.name),
          el("span", { class: "doctor-specialty" }, doctor.specialty),
        ),
      ),
    ),
  );
}

function selectDoctor(doctor) {
  if (state.doctor?.id === doctor.id) return;
  if (state.doctor) state.conn.request("unwatch", { doctor_id: state.doctor.id }).catch(() => {});
  state.doctor = doctor;
  state.weekStart = state.today;
  const url = new URL(location.href);
  url.searchParams.set("doctor", doctor.id);
  history.replaceState(null, "", url);
  for (const button of document.querySelectorAll("[data-testid=doctor-results] button")) {
    button.setAttribute("aria-pressed", String(Number(button.dataset.doctorId) === doctor.id));
  }
  openWeek();
}

// ---- the week ------------------------------------------------------------------------

function openWeek() {
  // The doctor's local dates that can hold a slot of the patient's week: zones
  // are at most 26 hours apart, so two days either side is always enough.
  const calendar = new Calendar(state.doctor.id, addDays(state.weekStart, -2), addDays(state.weekStart, 9));
  state.calendar = calendar;
  renderWeekFrame();
  watch(calendar);
}

/** Watch (or re-watch, resuming with `since`) a calendar, and apply the reply. */
async function watch(calendar) {
  calendar.watching();
  try {
    const reply = await state.conn.request("watch", calendar.watchBody());
    if (calendar !== state.calendar) return; // the patient moved on meanwhile
    if (reply.type === "snapshot") {
      calendar.applySnapshot(reply.body);
      renderSlots();
    } else {
      calendar.applyResumed(reply.body); // the missed deltas follow as pushes
    }
    $("[data-testid=calendar]").dataset.version = calendar.version;
  } catch (error) {
    if (calendar !== state.calendar || error.code === "offline") return;
    fail(error);
  }
}

function onDelta(delta) {
  const calendar = state.calendar;
  if (!calendar || delta.doctor_id !== calendar.doctorId) return;
  const { outcome, changed, removed } = calendar.applyDelta(delta);
  if (outcome === "gap") {
    watch(calendar); // resumes from calendar.version
    return;
  }
  if (outcome !== "applied") return;
  for (const id of changed) placeSlot(calendar.slots.get(id));
  for (const id of removed) document.querySelector(`.slot[data-slot-id="${id}"]`)?.remove();
  $("[data-testid=calendar]").dataset.version = calendar.version;
  refreshEmptyDays();
}

function renderWeekFrame() {
  const doctor = state.doctor;
  $("#calendar-section").hidden = false;
  $("#calendar-hint").hidden = true;
  $("#doctor-heading").textContent = doctor.name;
  $("#doctor-specialty").textContent = doctor.specialty ?? "";
  renderTzNote(doctor.timezone);
  const end = addDays(state.weekStart, 6);
  $("#week-label").textContent = `${dayMonth(state.weekStart)} – ${dayMonth(end)}`;
  $("#prev-week").disabled = state.weekStart <= state.today;

  const grid = $("[data-testid=calendar]");
  grid.dataset.doctorId = doctor.id;
  delete grid.dataset.version;
  const days = [];
  for (let i = 0; i < 7; i++) {
    const day = addDays(state.weekStart, i);
    const [weekday, ...date] = dayLong(day).split(" ");
    days.push(
      el(
        "section",
        { class: "day", "data-testid": "day", dataset: { date: day }, "aria-labelledby": `day-${day}` },
        el(
          "h3",
          { id: `day-${day}` },
          el("span", { class: "weekday" }, weekday),
          " ",
          el("span", { class: "date" }, date.join(" ")),
          day === state.today ? el("span", { class: "today" }, "Today") : null,
        ),
        el("div", { class: "slots" }),
        el("p", { class: "empty" }, "Loading…"),
      ),
    );
  }
  grid.replaceChildren(...days);
}

function renderTzNote(doctorZone) {
  const note = $("[data-testid=tz-note]");
  let text = `Times shown in your time zone (${zone}).`;
  if (doctorZone && doctorZone !== zone) {
    text += ` ${state.doctor.name} works in ${doctorZone} (${utcOffset(doctorZone)}).`;
  }
  note.textContent = text;
}

function renderSlots() {
  const calendar = state.calendar;
  renderTzNote(calendar.timezone);
  for (const slots of document.querySelectorAll("[data-testid=day] .slots")) slots.replaceChildren();
  const ordered = [...calendar.slots.values()].sort((a, b) => Date.parse(a.start) - Date.parse(b.start));
  for (const slot of ordered) placeSlot(slot, { animate: false });
  refreshEmptyDays();
}

/** Create or update a slot's button, in its day, in start order. */
function placeSlot(slot, { animate = true } = {}) {
  let button = document.querySelector(`.slot[data-slot-id="${slot.id}"]`);
  const day = document.querySelector(`[data-testid=day][data-date="${dateKey(slot.start, zone)}"] .slots`);
  if (!day) {
    button?.remove(); // outside the patient's week
    return;
  }
  if (!button) {
    button = el(
      "button",
      { type: "button", class: "slot", dataset: { slotId: slot.id, start: slot.start }, onclick: () => holdSlot(slot.id) },
      el("span", { class: "time" }, timeHM(slot.start, zone)),
      el("span", { class: "tag" }),
    );
    const next = [...day.children].find((other) => other.dataset.start > slot.start);
    day.insertBefore(button, next ?? null);
    animate = false; // a new slot simply appears
  }
  renderSlot(button, slot, animate);
}

function describeSlot(slot) {
  const mine = state.hold?.slot_id === slot.id;
  if (slot.status === "busy-tentative") return mine ? ["held by you", "Your hold"] : ["held by someone", "Held"];
  if (slot.status === "busy") return ["taken", ""];
  if (slot.status === "busy-unavailable") return ["unavailable", ""];
  const reason = state.calendar.unbookableReason(slot);
  if (reason === "started") return ["already started", ""];
  if (reason === "too_late") return ["too soon to book", "Too soon"];
  if (reason === "outside_horizon") return ["not bookable yet", "Not yet"];
  return ["available", ""];
}

function renderSlot(button, slot, animate) {
  const [spoken, tag] = describeSlot(slot);
  const day = dateKey(slot.start, zone);
  const bookable = slot.status === "free" && spoken === "available";
  button.dataset.status = slot.status;
  button.disabled = !bookable;
  button.setAttribute("aria-label", `${dayLong(day)}, ${timeHM(slot.start, zone)}, ${spoken}`);
  button.querySelector(".tag").textContent = tag;
  button.classList.toggle("mine", state.hold?.slot_id === slot.id);
  button.classList.toggle("unbookable", slot.status === "free" && !bookable);

  // A slot that goes (booked, blocked, already started) fades and collapses,
  // then stays in the DOM only visually hidden: its status is still readable.
  const goes = GONE.has(slot.status) || spoken === "already started";
  clearTimeout(Number(button.dataset.leaveTimer));
  if (!goes) {
    button.classList.remove("leaving", "gone");
  } else if (!animate || reducedMotion()) {
    button.classList.add("leaving", "gone");
  } else if (!button.classList.contains("gone")) {
    button.classList.add("leaving");
    button.dataset.leaveTimer = setTimeout(() => {
      button.classList.add("gone");
      refreshEmptyDays();
    }, LEAVE_MS);
  }
}

/** Re-render every slot (time passes: slots start, the bookable window slides). */
function refreshSlots() {
  const calendar = state.calendar;
  if (!calendar || calendar.version === null) return;
  for (const button of document.querySelectorAll(".slot")) {
    const slot = calendar.slots.get(Number(button.dataset.slotId));
    if (slot) renderSlot(button, slot, false);
  }
  refreshEmptyDays();
}

function refreshEmptyDays() {
  for (const day of document.querySelectorAll("[data-testid=day]")) {
    const open = day.querySelectorAll(".slot:not(.leaving)").length;
    const empty = day.querySelector(".empty");
    empty.hidden = open > 0;
    empty.textContent = "No free times";
  }
}

function moveWeek(days) {
  const next = addDays(state.weekStart, days);
  if (next < state.today) return;
  state.weekStart = next;
  openWeek();
}

// ---- holds -----------------------------------------------------------------------------

async function holdSlot(slotId) {
  const intention = `hold:${slotId}`;
  const button = document.querySelector(`.slot[data-slot-id="${slotId}"]`);
  button?.setAttribute("aria-busy", "true");
  try {
    const { body } = await state.conn.request(
      "hold",
      { slot_id: slotId, idempotency_key: intentions.key(intention) },
      { retry: true },
    );
    intentions.settle(intention);
    const previous = state.hold;
    rememberFromReply(body.appointment);
    setHold(body.appointment);
    $("#confirm-hold").focus();
    // One hold at a time on this page: holding another slot gives the old one back.
    if (previous && previous.id !== body.appointment.id) releaseHold(previous, { quiet: true });
  } catch (error) {
    intentions.settle(intention, error);
    fail(error);
  } finally {
    button?.removeAttribute("aria-busy");
  }
}

function setHold(appointment) {
  const previousSlot = state.hold?.slot_id;
  state.hold = appointment;
  const panel = $("[data-testid=hold]");
  panel.hidden = false;
  document.body.classList.add("holding");
  renderHoldText();
  setPanelBusy(false);
  clearInterval(state.holdTimer);
  state.holdTimer = setInterval(tickHold, 1000);
  tickHold();
  rerenderSlot(previousSlot);
  rerenderSlot(appointment.slot_id);
}

function renderHoldText() {
  const hold = state.hold;
  if (!hold) return;
  $("#hold-what").textContent =
    `${doctorName(hold.doctor_id)} · ${dayLong(dateKey(hold.start, zone))}, ${timeHM(hold.start, zone)}`;
}

function clearHold() {
  const slotId = state.hold?.slot_id;
  state.hold = null;
  clearInterval(state.holdTimer);
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

function rerenderSlot(slotId) {
  const slot = state.calendar?.slots.get(slotId);
  const button = document.querySelector(`.slot[data-slot-id="${slotId}"]`);
  if (slot && button) renderSlot(button, slot, false);
}

const holdLeft = (hold) => Date.parse(hold.hold_expires_at) - HOLD_MARGIN_MS - serverNow();

function tickHold() {
  const hold = state.hold;
  if (!hold) return;
  const left = holdLeft(hold);
  $("[data-testid=countdown]").textContent = countdown(left);
  // While a confirm is in flight the server's answer says whether it was in
  // time; announcing the expiry now could contradict a "Booked" a moment later.
  if (left <= 0 && state.confirming !== hold.id) holdExpired(hold);
}

function holdExpired(hold) {
  if (state.hold?.id === hold.id) clearHold();
  if (state.expiredNotified.has(hold.id)) return;
  state.expiredNotified.add(hold.id);
  showNotice("hold_expired", `Your hold on ${timeHM(hold.start, zone)} expired; the slot is free again.`);
}

function setPanelBusy(busy) {
  const panel = $("[data-testid=hold]");
  // Chromium blurs a focused button when it is disabled: keep the keyboard in
  // the panel (focusable for this) so clearHold() knows where it was.
  if (busy && panel.contains(document.activeElement)) panel.focus({ preventScroll: true });
  for (const button of panel.querySelectorAll("button")) button.disabled = busy;
}

async function confirmHold() {
  const hold = state.hold;
  if (!hold) return;
  const intention = `book:${hold.id}`;
  setPanelBusy(true);
  state.confirming = hold.id;
  try {
    const { body } = await state.conn.request(
      "book",
      { hold_id: hold.id, idempotency_key: intentions.key(intention) },
      { retry: true },
    );
    intentions.settle(intention);
    rememberFromReply(body.appointment);
    if (state.hold?.id === hold.id) clearHold();
    const appointment = body.appointment;
    showNotice("booked", `Booked: ${shortDateTime(appointment.start, zone)} with ${doctorName(appointment.doctor_id)}`);
  } catch (error) {
    intentions.settle(intention, error);
    setPanelBusy(false);
    if (["hold_expired", "invalid_transition", "not_found", "not_holder"].includes(error.code)) {
      state.expiredNotified.add(hold.id); // the error says it already
      if (state.hold?.id === hold.id) clearHold();
      watchAppointments().catch(() => {});
    }
    fail(error);
  } finally {
    if (state.confirming === hold.id) state.confirming = null;
  }
}

async function releaseHold(hold, { quiet = false } = {}) {
  const intention = `release:${hold.id}`;
  if (!quiet) setPanelBusy(true);
  try {
    await state.conn.request(
      "release",
      { appointment_id: hold.id, idempotency_key: intentions.key(intention) },
      { retry: true },
    );
    intentions.settle(intention);
    if (state.hold?.id === hold.id) clearHold();
    if (!quiet) showNotice("released", `Released ${timeHM(hold.start, zone)}; the slot is free again.`);
  } catch (error) {
    intentions.settle(intention, error);
    if (state.hold?.id === hold.id) setPanelBusy(false);
    if (error.code === "hold_expired") holdExpired(hold);
    else if (!quiet) fail(error);
  }
}

// ---- my appointments --------------------------------------------------------------------

async function watchAppointments() {
  try {
    const { body } = await state.conn.request("watch_appointments", {});
    applyAppointmentList(body.appointments);
  } catch (error) {
    if (error.code !== "offline") fail(error);
  }
}

/** A fresh list (first load, reconnect, resync): it replaces what we knew. */
function applyAppointmentList(list) {
  const fresh = new Map(list.map((appointment) => [appointment.id, appointment]));
  // The list holds only upcoming ones; keep the final states we saw happen live.
  for (const [id, known] of state.appointments) {
    if (!fresh.has(id) && TERMINAL.has(known.status)) fresh.set(id, known);
  }
  state.appointments = fresh;

  // The hold survives reloads and reconnects: it is the pending appointment.
  const held = state.hold;
  if (held && fresh.get(held.id)?.status !== "pending") {
    if (holdLeft(held) <= 0) holdExpired(held);
    else clearHold();
  }
  if (!state.hold) {
    const pending = list
      // Not one whose expiry this page already announced (its countdown ends early).
      .filter((a) => a.status === "pending" && holdLeft(a) > 0 && !state.expiredNotified.has(a.id))
      .sort((a, b) => Date.parse(b.hold_expires_at) - Date.parse(a.hold_expires_at))[0];
    if (pending) setHold(pending);
  }
  renderAppointments();
  if (!state.doctorsLoaded && list.some((a) => !state.doctors.has(a.doctor_id))) loadAllDoctors().catch(() => {});
}

function onAppointmentEvent({ version, appointment }) {
  // Events may repeat or arrive late (relayed): apply each appointment's newest only.
  if (version <= (state.appointmentVersions.get(appointment.id) ?? 0)) return;
  state.appointmentVersions.set(appointment.id, version);
  const before = state.appointments.get(appointment.id);
  state.appointments.set(appointment.id, appointment);

  if (state.hold?.id === appointment.id && appointment.status !== "pending") {
    if (appointment.cancel_reason === "hold expired") holdExpired(state.hold);
    else clearHold();
  } else if (!state.hold && appointment.status === "pending" && holdLeft(appointment) > 0) {
    setHold(appointment); // held from another tab or device
  }
  if (
    before?.status === "booked" &&
    appointment.status === "cancelled" &&
    !state.cancelledByMe.has(appointment.id) &&
    appointment.cancel_reason !== "rescheduled"
  ) {
    showNotice(
      "cancelled",
      `${doctorName(appointment.doctor_id)}'s clinic cancelled your appointment on ${shortDateTime(appointment.start, zone)}.`,
    );
  }
  renderAppointments();
}

/** Replies (held, booked, cancel) carry no version: they only fill in what events have not. */
function rememberFromReply(appointment) {
  const known = state.appointments.get(appointment.id);
  if (!known || known.status === "pending" || appointment.status === "cancelled") {
    state.appointments.set(appointment.id, appointment);
  }
  renderAppointments();
}

function badgeText(appointment) {
  if (appointment.status !== "cancelled") return statusWords(appointment.status);
  if (appointment.cancel_reason === "rescheduled") return "Rescheduled";
  if (state.cancelledByMe.has(appointment.id) || appointment.cancel_reason === DEFAULT_CANCEL_REASON) {
    return "Cancelled by you";
  }
  return "Cancelled by the clinic";
}

function renderAppointments() {
  const list = $("[data-testid=my-appointments]");
  const shown = [...state.appointments.values()]
    // A hold that was given back or ran out is not an appointment any more.
    .filter((a) => !(a.status === "cancelled" && ["released", "hold expired"].includes(a.cancel_reason)))
    .sort((a, b) => Date.parse(a.start) - Date.parse(b.start));
  $("#no-appointments").hidden = shown.length > 0;
  const items = shown.map((appointment) => {
    const item =
      list.querySelector(`li[data-appointment-id="${appointment.id}"]`) ??
      el("li", { class: "appointment", dataset: { appointmentId: appointment.id } });
    renderAppointment(item, appointment);
    return item;
  });
  list.replaceChildren(...items); // moves existing items, so an open cancel form keeps its text
}

function renderAppointment(item, appointment) {
  const statusChanged = item.dataset.status !== appointment.status;
  item.dataset.status = appointment.status;
  if (!statusChanged && item.firstChild) {
    item.querySelector(".who").textContent = doctorName(appointment.doctor_id);
    return;
  }
  const clinicReason =
    appointment.status === "cancelled" && badgeText(appointment) === "Cancelled by the clinic" && appointment.cancel_reason
      ? el("p", { class: "reason" }, `Reason: ${appointment.cancel_reason}`)
      : null;
  item.replaceChildren(
    el(
      "div",
      { class: "appointment-head" },
      el("p", { class: "who" }, doctorName(appointment.doctor_id)),
      el("span", { class: `badge badge-${appointment.status}` }, badgeText(appointment)),
    ),
    el("p", { class: "when" }, `${dayLong(dateKey(appointment.start, zone))}, ${timeHM(appointment.start, zone)}`),
  );
  if (clinicReason) item.append(clinicReason);
  if (appointment.status === "booked") item.append(cancelControls(appointment));
  if (statusChanged && item.isConnected && !reducedMotion()) item.classList.add("fresh");
}

function cancelControls(appointment) {
  const wrap = el("div", { class: "cancel" });
  const open = () => {
    const reason = el("input", { id: `reason-${appointment.id}`, type: "text", maxlength: 500, required: true });
    reason.value = DEFAULT_CANCEL_REASON;
    const form = el(
      "form",
      { class: "cancel-form", onsubmit: (event) => (event.preventDefault(), cancelAppointment(appointment, reason.value.trim())) },
      el("label", { for: reason.id }, "Reason"),
      reason,
      el("div", { class: "actions" },
        el("button", { type: "submit", class: "btn btn-danger" }, "Confirm cancel"),
        el("button", { type: "button", class: "btn btn-quiet", onclick: close }, "Keep appointment"),
      ),
    );
    wrap.replaceChildren(form);
    reason.focus();
    reason.select();
  };
  const close = () => {
    wrap.replaceChildren(button);
    button.focus();
  };
  const button = el(
    "button",
    { type: "button", class: "btn btn-quiet", "aria-label": `Cancel ${timeHM(appointment.start, zone)}`, onclick: open },
    "Cancel",
  );
  wrap.append(button);
  return wrap;
}

async function cancelAppointment(appointment, reason) {
  if (!reason) return;
  const intention = `cancel:${appointment.id}:${reason}`;
  try {
    const { body } = await state.conn.request(
      "cancel",
      { appointment_id: appointment.id, reason, idempotency_key: intentions.key(intention) },
      { retry: true },
    );
    intentions.settle(intention);
    state.cancelledByMe.add(appointment.id);
    rememberFromReply(body.appointment);
    showNotice("cancelled", `Cancelled your appointment on ${shortDateTime(appointment.start, zone)}.`);
  } catch (error) {
    intentions.settle(intention, error);
    fail(error);
    if (error.code === "invalid_transition") watchAppointments();
  }
}

// ---- start ---------------------------------------------------------------------------------

async function main() {
  const session = await boot("patient");
  if (!session) return;
  const conn = session.conn;
  state.conn = conn;
  const wanted = Number(new URLSearchParams(location.search).get("doctor")) || null;

  conn.on("delta", onDelta);
  conn.on("appointment_event", onAppointmentEvent);
  conn.on("resync", ({ room }) => {
    if (room === "appointments") watchAppointments();
    else if (room === "availability" && state.calendar) watch(state.calendar);
  });
  conn.on("error", ({ code }) => showError(code)); // unsolicited errors
  // Pushes meant for other pages: this page never joins those rooms.
  conn.on("dashboard_delta", () => {});
  conn.on("presence", () => {});

  // Runs after every (re)connect: join the rooms again, resuming the calendar.
  conn.onReady = async () => {
    const tasks = [watchAppointments(), search()];
    if (!state.doctorsLoaded) tasks.push(loadAllDoctors().catch(() => {}));
    await Promise.all(tasks);
    if (state.calendar) {
      await watch(state.calendar); // since = the last applied version
    } else if (wanted) {
      selectDoctor(state.doctors.get(wanted) ?? { id: wanted, name: `Doctor ${wanted}`, specialty: "", timezone: null });
    }
  };

  $("#doctor-q").addEventListener("input", onSearchInput);
  $("#prev-week").addEventListener("click", () => moveWeek(-7));
  $("#next-week").addEventListener("click", () => moveWeek(7));
  $("#confirm-hold").addEventListener("click", confirmHold);
  $("#release-hold").addEventListener("click", () => state.hold && releaseHold(state.hold));
  setInterval(refreshSlots, 30_000);
  conn.start();
}

main();
