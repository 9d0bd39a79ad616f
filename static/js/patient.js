// The patient page: find a doctor, see a week of their slots change live,
// hold one (with a countdown), confirm or release it, see the booking
// confirmed, and follow (cancel, reschedule) one's own appointments. This file
// only wires the sections together and to the connection. State lives in plain
// objects without DOM (directory.js, week.js with calendar.js, hold.js,
// appointments.js); each section draws its part (patient-search.js,
// patient-week.js, patient-hold.js, patient-appointments.js,
// patient-confirmation.js, patient-reschedule.js). Every change from the server
// flows through the same few functions, whether it came from a reply, a push or
// a resume after reconnecting. While the page is offline the calendar is
// visibly inactive, and nothing pressed then is sent later.

import { MyAppointments } from "./appointments.js";
import { Intentions, ServerError } from "./connection.js";
import { Doctors } from "./directory.js";
import { browserZone, dateKey } from "./format.js";
import { Hold } from "./hold.js";
import { errorCode } from "./messages.js";
import { myAppointments } from "./patient-appointments.js";
import { confirmationView } from "./patient-confirmation.js";
import { holdPanel } from "./patient-hold.js";
import { rescheduler } from "./patient-reschedule.js";
import { doctorSearch } from "./patient-search.js";
import { weekGrid } from "./patient-week.js";
import { boot } from "./shell.js";
import { showError } from "./ui.js";
import { Week } from "./week.js";

const zone = browserZone();
const $ = (selector) => document.querySelector(selector);

function fail(error) {
  if (!(error instanceof ServerError)) console.error(error); // a bug of ours: keep it visible to developers
  showError(errorCode(error));
}

/** What every section shares: the connection (set once booted), the state, and how to fail. */
const page = {
  conn: null,
  zone,
  intentions: new Intentions(),
  fail,
  doctors: new Doctors(),
  week: new Week(dateKey(Date.now(), zone)),
  hold: new Hold(),
  appointments: new MyAppointments(),
  /** A doctor's IANA zone, for the clinic's time beside the patient's; the patient's own while unknown. */
  doctorZone(doctorId) {
    const known = page.doctors.byId.get(doctorId)?.timezone;
    if (known) return known;
    const calendar = page.week.calendar;
    return (calendar?.doctorId === doctorId && calendar.timezone) || zone;
  },
  /** "Book again" on a lapsed hold or a cancelled appointment: that doctor's week, at that day. */
  bookAgain: (appointment) => bookAgain(appointment),
};

// The sections call each other only through these hooks.
const search = doctorSearch(page, {
  onNamed: () => {
    panel.renderText();
    appointments.render(); // updates the names in place
  },
  onPick: (doctor) => selectDoctor(doctor),
});
const week = weekGrid(page, {
  onPickSlot: (slotId) => {
    confirmation.close({ focus: false });
    if (moving.active()) moving.pick(slotId);
    else panel.take(slotId);
  },
});
const confirmation = confirmationView(page, { onClose: () => $("#main").focus({ preventScroll: true }) });
const panel = holdPanel(page, {
  rerenderSlot: (slotId) => week.rerenderSlot(slotId),
  remember: (appointment) => {
    appointments.remember(appointment);
    week.rerenderSlot(appointment.slot_id); // booked: "your appointment" in the week
  },
  resync: () => appointments.watch(),
  confirmed: (appointment) => confirmation.show(appointment),
});
const moving = rescheduler(page, {
  showDoctor: (doctorId) => selectDoctor(page.doctors.byIdOrStandIn(doctorId)),
  remember: (appointment) => appointments.remember(appointment),
  moved: (appointment) => confirmation.show(appointment, { moved: true }),
  resync: () => appointments.watch().catch(() => {}),
});
const appointments = myAppointments(page, {
  panel,
  loadAllDoctors: () => search.loadAll(),
  reschedule: (appointment) => {
    confirmation.close({ focus: false });
    moving.start(appointment);
  },
});

/** Back to a doctor's week at the day of an appointment that fell through. */
function bookAgain(appointment) {
  moving.stop({ focus: false });
  selectDoctor(page.doctors.byIdOrStandIn(appointment.doctor_id));
  const day = dateKey(appointment.start, zone);
  if (day < page.week.start || day > page.week.end) {
    week.move(Math.round((Date.parse(day) - Date.parse(page.week.start)) / 86_400_000));
  }
  const heading = $("#doctor-heading");
  heading.setAttribute("tabindex", "-1");
  heading.scrollIntoView({ block: "start" });
  heading.focus({ preventScroll: true });
}

/** Offline: the calendar cannot be acted on, and says so; back online it is drawn afresh. */
function onConnectionState(state) {
  const offline = state === "offline";
  document.body.classList.toggle("offline", offline);
  $("#offline-note").hidden = !offline;
  if (offline) {
    for (const button of document.querySelectorAll("[data-testid=calendar] .slot")) button.disabled = true;
  } else if (state === "online") {
    week.refresh();
  }
  if (offline || state === "online") panel.connectionChanged(state === "online");
}

/** Show a doctor's week: stop watching the previous one, note it in the address. */
function selectDoctor(doctor) {
  const previous = page.week.doctor;
  if (previous?.id === doctor.id) return;
  if (moving.active() && moving.doctorId() !== doctor.id) moving.stop({ focus: false }); // a new time is with the same doctor
  if (previous) page.conn.request("unwatch", { doctor_id: previous.id }).catch(() => {});
  page.week.select(doctor);
  const url = new URL(location.href);
  url.searchParams.set("doctor", doctor.id);
  history.replaceState(null, "", url);
  search.markChosen(doctor.id);
  $("#next-free-status").textContent = "";
  week.open();
}

/**
 * "Next available": the server finds the doctor's next slot that can be held
 * (a bounded read, `next_available`), and the week that has it opens with the
 * keyboard on it; or the patient is told there is none.
 */
async function nextAvailable() {
  const doctor = page.week.doctor;
  if (!doctor) return;
  const status = $("#next-free-status");
  status.textContent = "";
  try {
    const { body } = await page.conn.request("next_available", { doctor_id: doctor.id });
    if (page.week.doctor?.id !== doctor.id) return; // another doctor was chosen meanwhile
    if (!body.slot) {
      status.textContent = `${doctor.name} has no free time to book yet.`;
      return;
    }
    week.showSlot(dateKey(body.slot.start, zone), body.slot.id);
  } catch (error) {
    if (!page.conn.recover(error)) page.fail(error);
  }
}

/** An admin renamed or retired a doctor this page watches: new names everywhere, a
 * search that no longer lists a retired doctor, and a word if it is the one shown. */
function onDirectoryChange(doctor) {
  page.doctors.remember([doctor]);
  panel.renderText();
  appointments.render();
  search.search().catch(() => {});
  if (page.week.doctor?.id !== doctor.id) return;
  page.week.doctor = { ...page.week.doctor, ...doctor };
  $("#doctor-heading").textContent = doctor.name;
  $("#doctor-specialty").textContent = doctor.specialty;
  if (doctor.retired_at) showError("doctor_retired");
}

/** Whether a delta's entry changes what the page shows of the doctor. Every schedule
 * save carries the entry too (for the booking rules the week applies itself), and a
 * search per open page on each save would be load for nothing. */
function listedDifferently(doctor) {
  const known = page.doctors.byId.get(doctor.id);
  if (!known) return true;
  return ["name", "specialty", "timezone", "retired_at"].some((key) => (known[key] ?? null) !== (doctor[key] ?? null));
}

async function main() {
  const session = await boot("patient");
  if (!session) return;
  const conn = session.conn;
  page.conn = conn;
  const wanted = Number(new URLSearchParams(location.search).get("doctor")) || null;

  conn.on("delta", (delta) => {
    week.onDelta(delta);
    if (delta.doctor && listedDifferently(delta.doctor)) onDirectoryChange(delta.doctor);
  });
  conn.on("appointment_event", (event) => {
    appointments.onEvent(event);
    week.rerenderSlot(event.appointment.slot_id); // "your appointment" comes and goes
    moving.update(event.appointment);
    confirmation.update(event.appointment);
  });
  conn.addEventListener("state", (event) => onConnectionState(event.detail));
  conn.on("resync", ({ room }) => {
    if (room === "appointments") appointments.watch().then(week.refresh);
    else if (room === "availability" && page.week.calendar) week.watch(page.week.calendar);
  });
  conn.on("error", ({ code }) => showError(code)); // unsolicited errors
  // Pushes meant for other pages: this page never joins those rooms.
  conn.on("dashboard_delta", () => {});
  conn.on("presence", () => {});

  // After the sign-in form, the keyboard starts on the page's main heading, not <body>.
  let focusHeading = session.signedIn;

  // Runs after every (re)connect: join the rooms again, resuming the calendar.
  conn.onReady = async () => {
    const tasks = [appointments.watch().then(week.refresh), search.search()];
    if (!page.doctors.loaded) tasks.push(search.loadAll().catch(() => {}));
    await Promise.all(tasks);
    if (page.week.calendar) {
      await week.watch(page.week.calendar); // since = the last applied version
    } else if (wanted) {
      selectDoctor(page.doctors.byIdOrStandIn(wanted));
    }
    if (focusHeading) {
      focusHeading = false;
      $(page.week.doctor ? "#doctor-heading" : "#find-h").focus();
    }
  };

  $("#doctor-q").addEventListener("input", search.onInput);
  $("#doctor-q").addEventListener("keydown", search.onKeyDown);
  $("#next-free").addEventListener("click", nextAvailable);
  $("#prev-week").addEventListener("click", () => week.move(-7));
  $("#next-week").addEventListener("click", () => week.move(7));
  $("#confirm-hold").addEventListener("click", panel.confirm);
  $("#release-hold").addEventListener("click", panel.releaseShown);
  $("[data-testid=jump-appointments]").addEventListener("click", (event) => {
    event.preventDefault(); // no fragment in the address: the page reads its token from there
    const heading = $("#appointments-h");
    heading.scrollIntoView({ block: "start" });
    heading.focus({ preventScroll: true });
  });
  setInterval(week.refresh, 30_000);
  conn.start();
}

main();
