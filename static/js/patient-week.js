// The patient page's week grid: the doctor's heading, the time zone note, a
// column per day, and a button per slot that changes live. The week and its
// Calendar are state (week.js, calendar.js); this watches the calendar and
// draws it. Every change flows through placeSlot/renderSlot, whether it came
// from a snapshot, a delta or a resume after reconnecting.

import { dateKey, dayLong, dayMonth, timeHM, utcOffset } from "./format.js";
import { el, reducedMotion } from "./ui.js";
import { describeSlot } from "./week.js";

const LEAVE_MS = 600; // matches the CSS transition of a slot that goes

const $ = (selector) => document.querySelector(selector);

/** `page`: {conn, zone, week, hold, fail}. `onPickSlot(slotId)` holds a slot. */
export function weekGrid(page, { onPickSlot }) {
  const zone = page.zone;

  /** Show the week of `page.week` afresh: a new Calendar, a new frame, a new watch. */
  function open() {
    const calendar = page.week.open();
    renderFrame();
    watch(calendar);
  }

  /** Watch (or re-watch, resuming with `since`) a calendar, and apply the reply. */
  async function watch(calendar) {
    calendar.watching();
    try {
      const reply = await page.conn.request("watch", calendar.watchBody());
      if (calendar !== page.week.calendar) return; // the patient moved on meanwhile
      if (reply.type === "snapshot") {
        calendar.applySnapshot(reply.body);
        renderSlots();
      } else {
        calendar.applyResumed(reply.body); // the missed deltas follow as pushes
      }
      $("[data-testid=calendar]").dataset.version = calendar.version;
    } catch (error) {
      if (calendar !== page.week.calendar) return;
      // A transient failure (the database down) is retried by the connection.
      if (!page.conn.recover(error)) page.fail(error);
    }
  }

  function onDelta(delta) {
    const calendar = page.week.calendar;
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

  function renderFrame() {
    const { doctor, today } = page.week;
    $("#calendar-section").hidden = false;
    $("#calendar-hint").hidden = true;
    $("#doctor-heading").textContent = doctor.name;
    $("#doctor-specialty").textContent = doctor.specialty ?? "";
    renderTzNote(doctor.timezone);
    $("#week-label").textContent = `${dayMonth(page.week.start)} – ${dayMonth(page.week.end)}`;
    $("#prev-week").disabled = page.week.atToday;

    const grid = $("[data-testid=calendar]");
    grid.dataset.doctorId = doctor.id;
    delete grid.dataset.version;
    const days = page.week.days().map((day) => {
      const [weekday, ...date] = dayLong(day).split(" ");
      return el(
        "section",
        { class: "day", "data-testid": "day", dataset: { date: day }, "aria-labelledby": `day-${day}` },
        el(
          "h3",
          { id: `day-${day}` },
          el("span", { class: "weekday" }, weekday),
          " ",
          el("span", { class: "date" }, date.join(" ")),
          day === today ? el("span", { class: "today" }, "Today") : null,
        ),
        el("div", { class: "slots" }),
        el("p", { class: "empty" }, "Loading…"),
      );
    });
    grid.replaceChildren(...days);
  }

  function renderTzNote(doctorZone) {
    let text = `Times shown in your time zone (${zone}).`;
    if (doctorZone && doctorZone !== zone) {
      text += ` ${page.week.doctor.name} works in ${doctorZone} (${utcOffset(doctorZone)}).`;
    }
    $("[data-testid=tz-note]").textContent = text;
  }

  function renderSlots() {
    const calendar = page.week.calendar;
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
        { type: "button", class: "slot", dataset: { slotId: slot.id, start: slot.start }, onclick: () => onPickSlot(slot.id) },
        el("span", { class: "time" }, timeHM(slot.start, zone)),
        el("span", { class: "tag" }),
      );
      const next = [...day.children].find((other) => other.dataset.start > slot.start);
      day.insertBefore(button, next ?? null);
      animate = false; // a new slot simply appears
    }
    renderSlot(button, slot, animate);
  }

  function renderSlot(button, slot, animate) {
    const mine = page.hold.isOn(slot.id);
    const { spoken, tag, bookable, goes } = describeSlot(slot, page.week.calendar, mine);
    const day = dateKey(slot.start, zone);
    button.dataset.status = slot.status;
    button.disabled = !bookable;
    button.setAttribute("aria-label", `${dayLong(day)}, ${timeHM(slot.start, zone)}, ${spoken}`);
    button.querySelector(".tag").textContent = tag;
    button.classList.toggle("mine", mine);
    button.classList.toggle("unbookable", slot.status === "free" && !bookable);

    // A slot that goes (booked, blocked, already started) fades and collapses,
    // then stays in the DOM only visually hidden: its status is still readable.
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

  /** Re-render one slot (the hold moved onto or off it). */
  function rerenderSlot(slotId) {
    const slot = page.week.calendar?.slots.get(slotId);
    const button = document.querySelector(`.slot[data-slot-id="${slotId}"]`);
    if (slot && button) renderSlot(button, slot, false);
  }

  /** Re-render every slot (time passes: slots start, the bookable window slides). */
  function refresh() {
    const calendar = page.week.calendar;
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

  function move(days) {
    if (page.week.move(days)) open();
  }

  return { open, watch, onDelta, rerenderSlot, refresh, move };
}
