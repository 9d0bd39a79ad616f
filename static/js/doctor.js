// The doctor's dashboard: today and the next six days as tabs, the chosen
// day's timeline (bookings, holds, arrivals, conflicts) updated live, actions
// per slot, a live feed of every change, and how many people are looking at
// the calendar right now. State is a DayBook per shown day plus per-day
// booking counts; render functions turn it into DOM.

import { Intentions } from "./connection.js";
import { DayBook, countsAsBooked } from "./dashboard.js";
import { addDays, browserZone, dateKey, dayLong, dayShort, timeHM, utcOffset } from "./format.js";
import { errorCode, statusWords } from "./messages.js";
import { boot } from "./shell.js";
import { el, reducedMotion, showError } from "./ui.js";

const FEED_LIMIT = 50;
const DEFAULT_CANCEL_REASON = "Cancelled by the clinic";

const intentions = new Intentions();
const $ = (selector) => document.querySelector(selector);

const state = {
  conn: null,
  doctorId: null,
  zone: browserZone(), // replaced by the doctor's zone as soon as it is known
  days: [], // the doctor's local dates shown as tabs
  selected: null,
  day: null, // DayBook of the selected date
  counts: new Map(), // date -> Map(appointment id -> appointment), for the tab counts
  cancelling: null, // appointment id whose cancel form is open
  busyRows: new Set(), // slot ids with a command in flight
};

const fail = (error) => showError(errorCode(error));
const hm = (instant) => timeHM(instant, state.zone);

// ---- the doctor and the days ------------------------------------------------------------

async function loadDoctor(demo) {
  let doctor = demo?.doctors.find((d) => d.id === state.doctorId);
  if (!doctor) {
    const { body } = await state.conn.request("search_doctors", { q: null, limit: 100 });
    doctor = body.doctors.find((d) => d.id === state.doctorId);
  }
  if (doctor) showDoctor(doctor.name, doctor.timezone);
}

function showDoctor(name, zone) {
  if (name) {
    $("#doctor-name").textContent = name;
    document.querySelector("[data-testid=whoami]").textContent = name;
  }
  if (zone && zone !== state.zone) {
    state.zone = zone;
    const shown = state.selected;
    setDays(); // "today" depends on the doctor's zone
    if (state.day && state.selected !== shown) watchDay();
  }
  const offset = utcOffset(state.zone);
  $("#zone-note").textContent = `Times in your clinic's time zone, ${state.zone} (${offset}).`;
}

function setDays() {
  const today = dateKey(Date.now(), state.zone);
  state.days = Array.from({ length: 7 }, (_, i) => addDays(today, i));
  if (!state.days.includes(state.selected)) state.selected = today;
  renderTabs();
}

function renderTabs() {
  const tabs = state.days.map((date, i) => {
    const count = [...(state.counts.get(date)?.values() ?? [])].filter(countsAsBooked).length;
    const selected = date === state.selected;
    return el(
      "button",
      {
        type: "button",
        role: "tab",
        class: "tab",
        id: `tab-${date}`,
        "aria-selected": String(selected),
        "aria-controls": "day-panel",
        tabindex: selected ? 0 : -1,
        dataset: { date },
        onclick: () => selectDay(date),
      },
      el("span", { class: "tab-day" }, i === 0 ? "Today" : dayShort(date)),
      el("span", { class: "tab-count" }, `${count} booked`),
    );
  });
  const focused = document.activeElement?.getAttribute("role") === "tab";
  $("#day-tabs").replaceChildren(...tabs);
  if (focused) document.getElementById(`tab-${state.selected}`)?.focus();
  $("#day-panel").setAttribute("aria-labelledby", `tab-${state.selected}`);
}

/** Arrow keys move between tabs (the ARIA tabs pattern): one tab stop for the whole list. */
function onTabKey(event) {
  const moves = { ArrowRight: 1, ArrowLeft: -1, Home: -Infinity, End: Infinity };
  if (!(event.key in moves)) return;
  event.preventDefault();
  const index = state.days.indexOf(state.selected);
  const next = Math.min(state.days.length - 1, Math.max(0, index + moves[event.key]));
  selectDay(state.days[next]);
  document.getElementById(`tab-${state.days[next]}`)?.focus();
}

function selectDay(date) {
  if (date === state.selected && state.day) return;
  state.selected = date;
  state.cancelling = null;
  renderTabs();
  watchDay();
}

// ---- the dashboard room ----------------------------------------------------------------------

async function watchDay() {
  const day = new DayBook(state.doctorId, state.selected);
  state.day = day;
  // A re-read of the same day (reconnect, gap) keeps showing the old rows meanwhile.
  if ($("[data-testid=timeline]").dataset.date !== day.date) renderTimeline();
  try {
    const { body } = await state.conn.request("watch_dashboard", { doctor_id: state.doctorId, date: day.date });
    if (day !== state.day) return; // another day was chosen meanwhile
    day.applyDashboard(body);
    if (body.timezone !== state.zone) showDoctor(null, body.timezone);
    setWatchers(body.watchers);
    rememberCounts(body.appointments);
    renderTimeline();
  } catch (error) {
    if (day === state.day && error.code !== "offline") fail(error);
  }
}

function onDashboardDelta(delta) {
  if (delta.doctor_id !== state.doctorId) return;
  addFeedItem(delta);
  rememberCounts(delta.appointments);
  const day = state.day;
  if (!day) return;
  const outcome = day.applyDelta(delta);
  if (outcome === "gap" || delta.kinds.includes("slots.conflict_resolved")) {
    // A missed version, or conflicts we cannot resolve from the delta alone: re-read the day.
    watchDay();
  } else if (outcome === "applied") {
    renderTimeline();
  }
}

function setWatchers(count) {
  const node = $("[data-testid=watchers]");
  node.textContent = String(count);
  node.setAttribute("aria-label", `${count} ${count === 1 ? "patient" : "patients"} viewing your calendar`);
}

/** Tab counts come from every date's appointments, kept current by the deltas. */
function rememberCounts(appointments) {
  for (const appointment of appointments) {
    const date = dateKey(appointment.start, state.zone);
    if (!state.counts.has(date)) state.counts.set(date, new Map());
    state.counts.get(date).set(appointment.id, appointment);
  }
  renderTabs();
}

/** Read each shown day's appointments; merged by id as each reply comes, like a delta. */
async function loadCounts() {
  await Promise.allSettled(
    state.days.map(async (date) => {
      const { body } = await state.conn.request("list_appointments", { doctor_id: state.doctorId, date });
      rememberCounts(body.appointments);
    }),
  );
}

// ---- the timeline ---------------------------------------------------------------------------------

function renderTimeline() {
  const list = $("[data-testid=timeline]");
  const day = state.day;
  list.dataset.date = day.date;
  if (day.version === null) {
    delete list.dataset.version;
    list.replaceChildren(el("li", { class: "empty" }, "Loading…"));
    return;
  }
  list.dataset.version = day.version;
  const rows = day.rows();
  if (rows.length === 0) {
    list.replaceChildren(el("li", { class: "empty" }, `No slots on ${dayLong(day.date)}.`));
    return;
  }
  // Rows are kept by slot id and rebuilt only when what they show changed, so
  // a keyboard user's focus and an open cancel form survive unrelated updates.
  const focusedRow = document.activeElement?.closest?.("[data-testid=slot-row]");
  const items = rows.map((row) => {
    const signature = rowSignature(row);
    let item = list.querySelector(`[data-testid=slot-row][data-slot-id="${row.slot.id}"]`);
    if (!item || item.dataset.signature !== signature) {
      const fresh = renderRow(row);
      fresh.dataset.signature = signature;
      if (item && !reducedMotion()) fresh.classList.add("fresh");
      // Keep the keyboard where it was: the row's first usable button, else the row itself.
      if (item && item === focusedRow) queueMicrotask(() => (fresh.querySelector("button:enabled") ?? fresh).focus());
      item = fresh;
    }
    return item;
  });
  list.replaceChildren(...items);
}

function rowSignature({ slot, appointment, conflict }) {
  return [
    slot.status,
    appointment?.id,
    appointment?.status,
    conflict,
    state.cancelling === appointment?.id,
    state.busyRows.has(slot.id),
  ].join("|");
}

const SLOT_WORDS = { free: "Free", "busy-tentative": "Held", busy: "Booked", "busy-unavailable": "Blocked" };

function renderRow({ slot, appointment, conflict }) {
  const time = hm(slot.start);
  const body = el("div", { class: "row-body" });
  if (appointment) {
    body.append(
      el("span", { class: "row-patient" }, appointment.patient_id),
      el(
        "span",
        { class: `badge badge-${appointment.status}`, dataset: { appointmentId: appointment.id, status: appointment.status } },
        statusWords(appointment.status),
      ),
    );
    if (appointment.status === "pending" && appointment.hold_expires_at) {
      body.append(el("span", { class: "row-note" }, `until ${hm(appointment.hold_expires_at)}`));
    }
  } else {
    body.append(el("span", { class: `badge badge-${slot.status}` }, SLOT_WORDS[slot.status] ?? slot.status));
  }
  if (conflict) body.append(el("span", { class: "badge badge-conflict" }, "Conflict: outside the schedule"));

  const busy = state.busyRows.has(slot.id);
  const action = (text, label, run, kind = "btn-quiet") =>
    el("button", { type: "button", class: `btn btn-small ${kind}`, "aria-label": label, disabled: busy, onclick: run }, text);
  const actions = el("div", { class: "row-actions" });
  if (!appointment && slot.status === "free") actions.append(action("Block", `Block ${time}`, () => slotCommand("block", slot)));
  if (!appointment && slot.status === "busy-unavailable") {
    actions.append(action("Unblock", `Unblock ${time}`, () => slotCommand("unblock", slot)));
  }
  if (appointment?.status === "booked") {
    actions.append(
      action("Arrived", `Mark ${time} arrived`, () => mark(appointment, "arrived"), "btn-primary"),
      action("No-show", `Mark ${time} no-show`, () => mark(appointment, "noshow")),
      action("Cancel", `Cancel ${time}`, () => openCancel(appointment)),
    );
  }
  if (appointment?.status === "arrived") {
    actions.append(action("Fulfilled", `Mark ${time} fulfilled`, () => mark(appointment, "fulfilled"), "btn-primary"));
  }

  const row = el(
    "li",
    {
      class: "row",
      "data-testid": "slot-row",
      tabindex: -1,
      dataset: conflict ? { slotId: slot.id, status: slot.status, conflict: "true" } : { slotId: slot.id, status: slot.status },
    },
    el("span", { class: "row-time" }, time),
    body,
    actions,
  );
  if (appointment && state.cancelling === appointment.id) row.append(cancelForm(appointment, time));
  return row;
}

function cancelForm(appointment, time) {
  const reason = el("input", { id: `reason-${appointment.id}`, type: "text", maxlength: 500, required: true });
  reason.value = DEFAULT_CANCEL_REASON;
  queueMicrotask(() => reason.isConnected && reason.focus());
  return el(
    "form",
    {
      class: "cancel-form",
      onsubmit: (event) => {
        event.preventDefault();
        cancel(appointment, reason.value.trim());
      },
    },
    el("label", { for: reason.id }, `Reason for cancelling ${time}`),
    reason,
    el(
      "div",
      { class: "actions" },
      el("button", { type: "submit", class: "btn btn-small btn-danger" }, "Confirm cancel"),
      el("button", { type: "button", class: "btn btn-small btn-quiet", onclick: closeCancel }, "Keep appointment"),
    ),
  );
}

function openCancel(appointment) {
  state.cancelling = appointment.id;
  renderTimeline();
}

function closeCancel() {
  state.cancelling = null;
  renderTimeline();
}

// ---- commands ------------------------------------------------------------------------------------
// Replies are not applied to the timeline: the dashboard_delta of the same
// version follows and is the one source of truth, in order.

async function run(slotId, intention, type, body) {
  state.busyRows.add(slotId);
  renderTimeline();
  try {
    await state.conn.request(type, { ...body, idempotency_key: intentions.key(intention) }, { retry: true });
    intentions.settle(intention);
    return true;
  } catch (error) {
    intentions.settle(intention, error);
    fail(error);
    return false;
  } finally {
    state.busyRows.delete(slotId);
    renderTimeline();
  }
}

const slotCommand = (type, slot) => run(slot.id, `${type}:${slot.id}`, type, { slot_id: slot.id });

const mark = (appointment, status) =>
  run(appointment.slot_id, `mark:${appointment.id}:${status}`, "mark", { appointment_id: appointment.id, status });

async function cancel(appointment, reason) {
  if (!reason) return;
  const done = await run(appointment.slot_id, `cancel:${appointment.id}:${reason}`, "cancel", {
    appointment_id: appointment.id,
    reason,
  });
  if (done) closeCancel();
}

// ---- live feed -------------------------------------------------------------------------------------

const KIND_WORDS = {
  "slot.held": (who) => `held by ${who}`,
  "slot.booked": (who) => `booked by ${who}`,
  "hold.released": (who) => `hold released by ${who}`,
  "hold.expired": () => "hold expired",
  "appointment.cancelled": (who, actorRole) => (actorRole === "patient" ? `cancelled by ${who}` : "cancelled"),
  "appointment.rescheduled": () => "rescheduled",
  "appointment.arrived": () => "arrived",
  "appointment.fulfilled": () => "fulfilled",
  "appointment.noshow": () => "no-show",
  "slot.blocked": () => "blocked",
  "slot.unblocked": () => "unblocked",
  "slots.opened": () => "new slots opened",
  "slots.closed": () => "slots closed",
  "slots.conflict": () => "conflict with the schedule",
  "slots.conflict_resolved": () => "conflict resolved",
  "schedule.changed": () => "schedule changed",
};

function feedText(delta) {
  // A schedule change carries several kinds (closed, opened, conflict): one line says it.
  if (delta.kinds.includes("schedule.changed")) {
    const n = delta.conflicts.length;
    return n === 0 ? "Schedule changed" : `Schedule changed: ${n} ${n === 1 ? "booking is" : "bookings are"} now outside it`;
  }
  const [actorRole, actorSubject] = (delta.actor ?? "").split(/:(.*)/s);
  const appointment = delta.appointments[0];
  const who = appointment?.patient_id ?? actorSubject ?? "someone";
  const verbs = delta.kinds.map((kind) => (KIND_WORDS[kind] ?? (() => kind.replace(/[._]/g, " ")))(who, actorRole));
  const subject = appointment ?? (delta.slots.length === 1 ? delta.slots[0] : null);
  let when = "";
  if (subject) {
    const date = dateKey(subject.start, state.zone);
    when = `${date === state.days[0] ? "" : `${dayShort(date)} `}${hm(subject.start)} `;
  }
  return `${when}${verbs.join(", ") || "calendar updated"}`;
}

function addFeedItem(delta) {
  const feed = $("[data-testid=feed]");
  $("#feed-empty").hidden = true;
  const item = el(
    "li",
    { class: reducedMotion() ? "" : "fresh", dataset: { version: delta.version } },
    feedText(delta),
    " ",
    el("span", { class: "feed-when" }, `at ${timeHM(Date.now(), browserZone())}`),
  );
  feed.prepend(item);
  while (feed.children.length > FEED_LIMIT) feed.lastElementChild.remove();
}

// ---- start -----------------------------------------------------------------------------------------

async function main() {
  const session = await boot("doctor");
  if (!session) return;
  const { conn, claims, demo } = session;
  state.conn = conn;
  // A doctor's token subject is the doctor id; an admin picks one with ?doctor=.
  state.doctorId = Number(claims.role === "doctor" ? claims.sub : new URLSearchParams(location.search).get("doctor"));
  if (!Number.isInteger(state.doctorId) || state.doctorId < 1) {
    showError("not_found");
    return;
  }
  const known = demo?.doctors.find((d) => d.id === state.doctorId);
  if (known) showDoctor(known.name, known.timezone);
  else showDoctor(null, null);
  setDays();

  conn.on("dashboard_delta", onDashboardDelta);
  conn.on("presence", ({ doctor_id, watchers }) => doctor_id === state.doctorId && setWatchers(watchers));
  conn.on("resync", ({ room }) => room === "dashboard" && watchDay());
  conn.on("error", ({ code }) => showError(code)); // unsolicited errors
  // Pushes of rooms this page never joins.
  conn.on("delta", () => {});
  conn.on("appointment_event", () => {});

  // After every (re)connect: a fresh dashboard (dashboards are not resumed) and fresh counts.
  conn.onReady = async () => {
    if (!known) await loadDoctor(demo).catch(() => {});
    await Promise.all([watchDay(), loadCounts()]);
  };

  $("#day-tabs").addEventListener("keydown", onTabKey);
  conn.start();
}

main();
