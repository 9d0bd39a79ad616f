// The front desk (/clinic): every doctor's day side by side, live, for staff
// who work for no one doctor (an admin token; a doctor sees only their own
// day here, as everywhere). Each doctor shown is one dashboard room joined on
// this connection (watch_dashboard; at most SHOWN at once, well under the
// server's per-connection cap), so bookings made anywhere appear here as they
// happen, under the same version rules as the doctor's own page (a DayBook
// per doctor, dashboard.js). The search narrows the doctors (name or
// specialty; Enter goes to the first), the date picker chooses the day (each
// doctor's own local date), and the print stylesheet turns the page into the
// day list: per doctor, the day's appointments with time, patient, reason and
// contact. Booking (a free time not yet begun), cancelling and rescheduling
// (to any day) for a patient who phones in are the dialogs of clinic-desk.js.

import { deskDialogs } from "./clinic-desk.js";
import { serverNow } from "./clock.js";
import { Intentions } from "./connection.js";
import { DayBook } from "./dashboard.js";
import { browserZone, dateKey, dayLong, timeHM, zoneLabel, zonePlace } from "./format.js";
import { errorCode, statusWords } from "./messages.js";
import { boot } from "./shell.js";
import { el, keyedRows, showError } from "./ui.js";

// Doctors watched at once: a screenful, and well under SLOTCAST_MAX_WATCHES (32) so that
// a search replacing them never meets the cap while the old ones are being left.
const SHOWN = 12;
const SEARCH_DELAY_MS = 250;
const SLOT_WORDS = { free: "Free", "busy-tentative": "Held", busy: "Booked", "busy-unavailable": "Blocked" };

const $ = (selector) => document.querySelector(selector);

/** What the page and its dialogs share. */
const page = {
  conn: null,
  intentions: new Intentions(),
  role: null,
  subject: null,
  date: dateKey(Date.now(), browserZone()),
  query: "",
  order: [], // doctor ids, in the directory's order
  doctors: new Map(), // id -> {doctor, day: DayBook, section, heading, meta, list}
  generation: 0, // the latest doctor list asked for; older answers are dropped
};

const desk = deskDialogs(page);

// ---- which doctors ------------------------------------------------------------------

/** The doctors to show: the search's first SHOWN (admins), or oneself (a doctor). */
async function findDoctors() {
  if (page.role === "doctor") {
    const id = Number(page.subject);
    const { body } = await page.conn.request("search_doctors", { q: null, limit: 100 });
    const me = body.doctors.find((d) => d.id === id);
    return { doctors: [me ?? { id, name: `Doctor ${id}`, specialty: "", timezone: "UTC" }], more: false };
  }
  const { body } = await page.conn.request("search_doctors", { q: page.query || null, limit: SHOWN + 1 });
  return { doctors: body.doctors.slice(0, SHOWN), more: body.doctors.length > SHOWN };
}

/**
 * Show the doctors found and follow their day. A doctor already followed for
 * this date keeps their room (a narrower search costs no request); `rewatch`
 * (after a reconnect: dashboards are not resumed) joins every room afresh.
 */
async function loadDoctors({ focusFirst = false, rewatch = false } = {}) {
  const generation = ++page.generation;
  let found;
  try {
    found = await findDoctors();
  } catch (error) {
    if (generation === page.generation && !page.conn.recover(error)) showError(errorCode(error));
    return;
  }
  if (generation !== page.generation) return;
  const { doctors, more } = found;
  const wanted = new Set(doctors.map((d) => d.id));
  for (const id of page.doctors.keys()) {
    if (wanted.has(id)) continue;
    page.doctors.get(id).section?.remove();
    page.doctors.delete(id);
    page.conn.request("unwatch_dashboard", { doctor_id: id }).catch(() => {}); // gone with the connection anyway
  }
  for (const doctor of doctors) {
    const entry = page.doctors.get(doctor.id);
    if (entry) entry.doctor = doctor;
    else page.doctors.set(doctor.id, { doctor, day: null });
  }
  page.order = doctors.map((d) => d.id);
  $("#clinic-doctors").replaceChildren(...page.order.map((id) => section(page.doctors.get(id))));
  showCount(doctors.length, more);
  const following = (entry) => entry.day?.date === page.date && !entry.day.awaitingReply;
  const stale = page.order.filter((id) => rewatch || !following(page.doctors.get(id)));
  const watching = Promise.all(stale.map((id) => watchDay(id)));
  if (focusFirst && page.order.length) page.doctors.get(page.order[0]).heading.focus();
  await watching;
}

function showCount(n, more) {
  const query = page.query ? ` matching “${page.query}”` : "";
  let text = n === 0 ? `No doctors${query}.` : `${n} ${n === 1 ? "doctor" : "doctors"}${query}.`;
  if (more) text += " More match: narrow the search to see them.";
  $("#clinic-count").textContent = page.role === "doctor" ? "" : text;
}

// ---- each doctor's day ----------------------------------------------------------------

async function watchDay(id) {
  const entry = page.doctors.get(id);
  if (!entry) return;
  const day = new DayBook(id, page.date);
  entry.day = day;
  renderDay(entry);
  try {
    const { body } = await page.conn.request("watch_dashboard", { doctor_id: id, date: day.date });
    if (entry.day !== day || page.doctors.get(id) !== entry) return; // another day or search meanwhile
    day.applyDashboard(body);
    renderDay(entry);
  } catch (error) {
    if (entry.day === day && !page.conn.recover(error)) showError(errorCode(error));
  }
}

function onDashboardDelta(delta) {
  const entry = page.doctors.get(delta.doctor_id);
  if (!entry?.day) return;
  const outcome = entry.day.applyDelta(delta);
  if (delta.doctor) entry.doctor = { ...entry.doctor, ...delta.doctor };
  if (outcome === "gap" || delta.kinds.includes("slots.conflict_resolved")) watchDay(delta.doctor_id);
  else if (outcome === "applied") renderDay(entry);
}

function section(entry) {
  if (!entry.section) {
    const { id } = entry.doctor;
    entry.heading = el("h2", { id: `doctor-${id}-h`, tabindex: -1 });
    entry.meta = el("p", { class: "muted clinic-doctor-meta" });
    entry.link = el("a", { class: "btn btn-small clinic-dashboard-link", href: `/doctor?doctor=${id}` }, "Dashboard");
    entry.list = el("ol", { class: "timeline clinic-day", "data-testid": "clinic-day" });
    entry.section = el(
      "section",
      { class: "card clinic-doctor", "data-testid": "clinic-doctor", dataset: { doctorId: id }, "aria-labelledby": entry.heading.id },
      el("div", { class: "clinic-doctor-head" }, el("div", {}, entry.heading, entry.meta), entry.link),
      entry.list,
    );
  }
  const { name, specialty, timezone } = entry.doctor;
  entry.heading.textContent = name;
  entry.link.setAttribute("aria-label", `Dashboard of ${name}`);
  const zone = entry.day?.timezone ?? timezone;
  // The clinic's own time, named as people say it ("Paris time (CET)"), not as an IANA id.
  entry.meta.textContent = [specialty, `${zonePlace(zone)} time (${zoneLabel(zone)})`].filter(Boolean).join(" · ");
  return entry.section;
}

function renderDay(entry) {
  section(entry);
  const { day, list } = entry;
  list.dataset.date = day.date;
  if (day.version === null) {
    delete list.dataset.version;
    list.replaceChildren(el("li", { class: "empty" }, "Loading…"));
    return;
  }
  list.dataset.version = day.version;
  const rows = day.rows();
  if (rows.length === 0) {
    list.replaceChildren(el("li", { class: "empty" }, `No hours on ${dayLong(day.date)}.`));
    return;
  }
  // Kept by slot, so a keyboard user's focus survives other doctors' and slots' updates.
  const items = keyedRows(list, "clinic-row", rows, rowSignature, (row) => renderRow(entry, row));
  if (!rows.some((row) => row.appointment)) {
    items.push(el("li", { class: "empty print-only" }, `No appointments on ${dayLong(day.date)}.`));
  }
  list.replaceChildren(...items);
}

function rowSignature({ slot, appointment, conflict }) {
  const a = appointment;
  return [slot.status, conflict, a?.id, a?.status, a?.patient_name, a?.visit_reason, a?.patient_contact].join("|");
}

function renderRow(entry, { slot, appointment, conflict }) {
  const time = timeHM(slot.start, entry.day.timezone);
  const body = el("div", { class: "row-body" });
  const actions = el("div", { class: "row-actions" });
  const doctorName = entry.doctor.name;
  if (appointment) {
    const who = appointment.patient_name ?? appointment.patient_id;
    body.append(
      el("span", { class: "row-patient", "data-testid": "patient", title: appointment.patient_id }, who),
      el(
        "span",
        { class: `badge badge-${appointment.status}`, dataset: { appointmentId: appointment.id, status: appointment.status } },
        statusWords(appointment.status),
      ),
    );
    const detail = (label, value, testid) =>
      el("span", { class: "row-detail", "data-testid": testid }, el("span", { class: "row-detail-label" }, `${label}: `), value);
    if (appointment.visit_reason) body.append(detail("Reason", appointment.visit_reason, "reason"));
    if (appointment.patient_contact) body.append(detail("Contact", appointment.patient_contact, "contact"));
    if (appointment.status === "booked") {
      const what = { doctor: entry.doctor, day: entry.day, slot, appointment, time, who };
      actions.append(
        el(
          "button",
          { type: "button", class: "btn btn-small", "aria-label": `Reschedule ${time}, ${who}`, onclick: (e) => desk.reschedule(what, e.currentTarget) },
          "Reschedule",
        ),
        el(
          "button",
          { type: "button", class: "btn btn-small btn-quiet", "aria-label": `Cancel ${time}, ${who}`, onclick: (e) => desk.cancel(what, e.currentTarget) },
          "Cancel",
        ),
      );
    }
  } else {
    body.append(el("span", { class: `badge badge-${slot.status}` }, SLOT_WORDS[slot.status] ?? slot.status));
    if (slot.status === "free" && Date.parse(slot.start) > serverNow()) {
      const what = { doctor: entry.doctor, day: entry.day, slot, time };
      actions.append(
        el(
          "button",
          { type: "button", class: "btn btn-small btn-primary", "aria-label": `Book ${time} with ${doctorName}`, onclick: (e) => desk.book(what, e.currentTarget) },
          "Book",
        ),
      );
    }
  }
  if (conflict) body.append(el("span", { class: "badge badge-conflict" }, "Conflict: outside the schedule"));
  const dataset = { slotId: slot.id, status: slot.status };
  if (appointment) dataset.appointmentId = appointment.id;
  return el(
    "li",
    { class: `row clinic-row${appointment ? " has-appointment" : ""}`, "data-testid": "clinic-row", tabindex: -1, dataset },
    el("span", { class: "row-time" }, time),
    body,
    actions,
  );
}

// ---- the controls ---------------------------------------------------------------------

function showDate() {
  $("#clinic-date").value = page.date;
  $("#clinic-day-label").textContent = dayLong(page.date);
  document.title = `Front desk · ${dayLong(page.date)} · Slotcast`;
}

function chooseDate(date) {
  if (!/^\d{4}-\d{2}-\d{2}$/.test(date) || date === page.date) return;
  page.date = date;
  showDate();
  for (const id of page.order) watchDay(id);
}

function wireControls() {
  const filter = $("#doctor-filter");
  let timer = null;
  const search = (focusFirst) => {
    clearTimeout(timer);
    page.query = filter.value.trim();
    return loadDoctors({ focusFirst });
  };
  filter.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(() => search(false), SEARCH_DELAY_MS);
  });
  filter.addEventListener("keydown", (event) => {
    if (event.key !== "Enter") return;
    event.preventDefault();
    search(true);
  });
  $("#clinic-filter").addEventListener("submit", (event) => event.preventDefault());
  $("#clinic-date").addEventListener("change", (event) => chooseDate(event.target.value));
  $("#clinic-today").addEventListener("click", () => chooseDate(dateKey(Date.now(), browserZone())));
  $("#clinic-print").addEventListener("click", () => window.print());
  if (page.role === "doctor") $("#doctor-filter-field").hidden = true;
}

async function main() {
  const session = await boot("doctor");
  if (!session) return;
  const { conn, claims } = session;
  page.conn = conn;
  page.role = claims.role;
  page.subject = claims.sub;
  showDate();
  wireControls();

  conn.on("dashboard_delta", onDashboardDelta);
  conn.on("resync", ({ room, doctor_id }) => {
    if (room !== "dashboard") return;
    if (doctor_id) watchDay(doctor_id);
    else for (const id of page.order) watchDay(id);
  });
  conn.on("error", ({ code }) => showError(code)); // unsolicited errors
  // Pushes this page has no use for (how many watch a calendar; rooms it never joins).
  conn.on("presence", () => {});
  conn.on("delta", () => {});
  conn.on("appointment_event", () => {});

  // After every (re)connect: the doctors and a fresh dashboard each (dashboards are not resumed).
  conn.onReady = () => loadDoctors({ rewatch: true });
  conn.start();
}

main();
