// The doctor's dashboard: today and the next six days as tabs, the chosen
// day's timeline (bookings, holds, arrivals, conflicts) updated live, actions
// per slot (a booked one can be rescheduled), a live feed of every change, how
// many people are looking at the calendar right now, and the schedule card
// (the editor with its preview, and blocking a day with a reason). This file only wires the sections together and to
// the connection. State lives in plain objects without DOM (dashboard.js: a
// DayBook for the shown day, the days, the per-day booking counts; feed.js
// for the feed's words); each section draws its part (doctor-days.js,
// doctor-timeline.js, doctor-feed.js, doctor-schedule.js).

import { Intentions } from "./connection.js";
import { BookedCounts, DashboardDays } from "./dashboard.js";
import { dayTabs } from "./doctor-days.js";
import { liveFeed } from "./doctor-feed.js";
import { scheduleCard } from "./doctor-schedule.js";
import { dayTimeline } from "./doctor-timeline.js";
import { browserZone } from "./format.js";
import { errorCode } from "./messages.js";
import { boot } from "./shell.js";
import { showError } from "./ui.js";

const $ = (selector) => document.querySelector(selector);

/** What every section shares: the connection (set once booted), the state, and how to fail. */
const page = {
  conn: null,
  intentions: new Intentions(),
  fail: (error) => showError(errorCode(error)),
  doctorId: null,
  days: new DashboardDays(browserZone()), // the zone becomes the doctor's as soon as it is known
  counts: new BookedCounts(),
  day: null, // DayBook of the selected date
};

// The sections call each other only through these hooks.
const tabs = dayTabs(page, {
  chosen: () => {
    schedule.showDay(page.days.selected);
    timeline.open();
  },
  shifted: () => timeline.watch(),
});
const timeline = dayTimeline(page, {
  showZone: (zone) => tabs.showDoctor(null, zone),
  rememberCounts: (appointments) => tabs.rememberCounts(appointments),
});
const feed = liveFeed(page);
const schedule = scheduleCard(page);

function onDashboardDelta(delta) {
  if (delta.doctor_id !== page.doctorId) return;
  feed.add(delta);
  tabs.rememberCounts(delta.appointments);
  timeline.onDelta(delta);
}

async function main() {
  const session = await boot("doctor");
  if (!session) return;
  const { conn, claims, demo } = session;
  page.conn = conn;
  // A doctor's token subject is the doctor id; an admin picks one with ?doctor=.
  page.doctorId = Number(claims.role === "doctor" ? claims.sub : new URLSearchParams(location.search).get("doctor"));
  if (!Number.isInteger(page.doctorId) || page.doctorId < 1) {
    showError("not_found");
    return;
  }
  const known = demo?.doctors.find((d) => d.id === page.doctorId);
  if (known) tabs.showDoctor(known.name, known.timezone);
  else tabs.showDoctor(null, null);
  tabs.reset();

  conn.on("dashboard_delta", onDashboardDelta);
  conn.on("presence", ({ doctor_id, watchers }) => doctor_id === page.doctorId && timeline.setWatchers(watchers));
  conn.on("resync", ({ room }) => room === "dashboard" && timeline.watch());
  conn.on("error", ({ code }) => showError(code)); // unsolicited errors
  // Pushes of rooms this page never joins.
  conn.on("delta", () => {});
  conn.on("appointment_event", () => {});

  // After every (re)connect: a fresh dashboard (dashboards are not resumed) and fresh counts.
  conn.onReady = async () => {
    if (!known) await tabs.loadDoctor(demo).catch(() => {});
    await Promise.all([timeline.watch(), tabs.loadCounts()]);
  };

  $("#day-tabs").addEventListener("keydown", tabs.onKey);
  schedule.start();
  schedule.showDay(page.days.selected);
  conn.start();
}

main();
