// The doctor page's header and day tabs: the doctor's name and zone, and
// today plus the next six days as tabs with their "n booked" counts. The days
// and counts are state (dashboard.js: DashboardDays, BookedCounts); this
// draws them and handles the tab keys.

import { dayShort, utcOffset } from "./format.js";
import { el } from "./ui.js";

const $ = (selector) => document.querySelector(selector);

/**
 * `page`: {conn, doctorId, days, counts, day}. `chosen()` shows the newly
 * chosen day; `shifted()` re-reads it when the doctor's zone moved the choice.
 */
export function dayTabs(page, { chosen, shifted }) {
  const days = page.days;

  /** Find the doctor's name and zone when the demo list did not have them. */
  async function loadDoctor(demo) {
    let doctor = demo?.doctors.find((d) => d.id === page.doctorId);
    if (!doctor) {
      const { body } = await page.conn.request("search_doctors", { q: null, limit: 100 });
      doctor = body.doctors.find((d) => d.id === page.doctorId);
    }
    if (doctor) showDoctor(doctor.name, doctor.timezone);
  }

  function showDoctor(name, zone) {
    if (name) {
      $("#doctor-name").textContent = name;
      document.querySelector("[data-testid=whoami]").textContent = name;
    }
    if (days.setZone(zone)) {
      const shown = days.selected;
      reset(); // "today" depends on the doctor's zone
      if (page.day && days.selected !== shown) shifted();
    }
    const offset = utcOffset(days.zone);
    $("#zone-note").textContent = `Times in your clinic's time zone, ${days.zone} (${offset}).`;
  }

  function reset() {
    days.reset();
    render();
  }

  function render() {
    const tabs = days.dates.map((date, i) => {
      const count = page.counts.booked(date);
      const selected = date === days.selected;
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
          onclick: () => select(date),
        },
        el("span", { class: "tab-day" }, i === 0 ? "Today" : dayShort(date)),
        el("span", { class: "tab-count" }, `${count} booked`),
      );
    });
    const focused = document.activeElement?.getAttribute("role") === "tab";
    $("#day-tabs").replaceChildren(...tabs);
    if (focused) document.getElementById(`tab-${days.selected}`)?.focus();
    $("#day-panel").setAttribute("aria-labelledby", `tab-${days.selected}`);
  }

  /** Arrow keys move between tabs (the ARIA tabs pattern): one tab stop for the whole list. */
  function onKey(event) {
    const next = days.step(event.key);
    if (next === null) return;
    event.preventDefault();
    select(next);
    document.getElementById(`tab-${next}`)?.focus();
  }

  function select(date) {
    if (date === days.selected && page.day) return;
    days.selected = date;
    render();
    chosen();
  }

  /** Tab counts come from every date's appointments, kept current by the deltas. */
  function rememberCounts(appointments) {
    page.counts.remember(appointments, days.zone);
    render();
  }

  /** Read each shown day's appointments; merged by id as each reply comes, like a delta. */
  async function loadCounts() {
    const results = await Promise.allSettled(
      days.dates.map(async (date) => {
        const { body } = await page.conn.request("list_appointments", { doctor_id: page.doctorId, date });
        rememberCounts(body.appointments);
      }),
    );
    // Counts missing because the database is down: read them again once it is back.
    const failed = results.find((r) => r.status === "rejected");
    if (failed) page.conn.recover(failed.reason);
  }

  return { loadDoctor, showDoctor, reset, onKey, rememberCounts, loadCounts };
}
