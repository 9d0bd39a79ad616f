// The patient page's week grid: the doctor's heading, the time zone note, a
// column per day, and a button per slot that changes live. The week and its
// Calendar are state (week.js, calendar.js); this watches the calendar and
// draws it. Every change flows through placeSlot/renderSlot, whether it came
// from a snapshot, a delta or a resume after reconnecting.
//
// For the keyboard the week is one ARIA grid (a row per day, a cell per slot)
// and one Tab stop: a roving tabindex on the slots that can be held, moved by
// the arrow keys (up and down through a day's times, left and right to the
// nearest time on the neighbouring days), Home/End, and PageUp/PageDown for
// the weeks. Without that, every slot was a Tab stop of its own (80 presses to
// get past a week).

import { dateKey, dayLong, dayMonth, dayShort, sameOffset, timeHM, zoneDistance, zoneLabel, zoneName, zonePlace } from "./format.js";
import { el, reducedMotion } from "./ui.js";
import { describeSlot } from "./week.js";

const LEAVE_MS = 600; // matches the CSS transition of a slot that goes
const DAY_MS = 86_400_000;
// Appointment statuses that keep the patient's visit in their week.
const VISIT = new Set(["booked", "arrived", "fulfilled"]);

const $ = (selector) => document.querySelector(selector);

/** `page`: {conn, zone, week, hold, appointments, fail}. `onPickSlot(slotId)` holds a slot. */
export function weekGrid(page, { onPickSlot }) {
  const zone = page.zone;
  let active = null; // the slot id holding the grid's one Tab stop
  let focusWhenLoaded = null; // after a week change by key or "next available": "first" or a slot id

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
        focusIfAsked();
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
    const { outcome, changed, removed, rules } = calendar.applyDelta(delta);
    if (outcome === "gap") {
      watch(calendar); // resumes from calendar.version
      return;
    }
    if (outcome !== "applied") return;
    for (const id of changed) placeSlot(calendar.slots.get(id));
    for (const id of removed) cellOf(id)?.remove();
    $("[data-testid=calendar]").dataset.version = calendar.version;
    if (rules) refresh(); // new notice or horizon: slots outside the old window may be bookable now
    else refreshDays();
  }

  /** The grid cell around a slot's button. */
  function cellOf(slotId) {
    return document.querySelector(`.slot[data-slot-id="${slotId}"]`)?.closest("[role=gridcell]") ?? null;
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
    grid.setAttribute("aria-label", `Times with ${doctor.name}, ${dayMonth(page.week.start)} to ${dayMonth(page.week.end)}`);
    delete grid.dataset.version;
    active = null;
    const days = page.week.days().map((day) => {
      const [weekday, ...date] = dayLong(day).split(" ");
      return el(
        "div",
        { class: "day", role: "row", "data-testid": "day", dataset: { date: day } },
        el(
          "div",
          { class: "day-head", role: "rowheader" },
          el(
            "h3",
            { id: `day-${day}` },
            el("span", { class: "weekday" }, weekday),
            " ",
            el("span", { class: "date" }, date.join(" ")),
            day === today ? el("span", { class: "today" }, "Today") : null,
          ),
          el("p", { class: "shift", "data-testid": "day-shift", hidden: true }),
        ),
        el("div", { class: "slots" }),
        el("div", { class: "empty", role: "gridcell" }, "Loading…"),
      );
    });
    grid.replaceChildren(...days);
  }

  /** The doctor's zone, once the snapshot says it (the directory's until then). */
  function doctorZone() {
    return page.week.calendar?.timezone ?? page.week.doctor?.timezone ?? null;
  }

  function renderTzNote(theirZone, shifted = false) {
    const note = $("[data-testid=tz-note]");
    let text = `Times are in your time zone, ${zoneName(zone)} (${zoneLabel(zone)}).`;
    const ids = [zone];
    if (theirZone && !sameOffset(theirZone, zone)) {
      const place = zonePlace(theirZone);
      text += ` ${page.week.doctor.name} works in ${place} (${zoneName(theirZone)}), ${zoneDistance(theirZone, zone)} you.`;
      if (shifted) text += ` Days marked “In ${place}” show times that fall on another date there.`;
      ids.push(theirZone);
    }
    note.textContent = text;
    note.title = ids.join(" · "); // the exact zones, for whoever needs them
  }

  function renderSlots() {
    const calendar = page.week.calendar;
    for (const slots of document.querySelectorAll("[data-testid=day] .slots")) slots.replaceChildren();
    const ordered = [...calendar.slots.values()].sort((a, b) => Date.parse(a.start) - Date.parse(b.start));
    for (const slot of ordered) placeSlot(slot, { animate: false });
    refreshDays();
  }

  /** Create or update a slot's button, in its day, in start order. */
  function placeSlot(slot, { animate = true } = {}) {
    let button = document.querySelector(`.slot[data-slot-id="${slot.id}"]`);
    const day = document.querySelector(`[data-testid=day][data-date="${dateKey(slot.start, zone)}"] .slots`);
    if (!day) {
      button?.closest("[role=gridcell]")?.remove(); // outside the patient's week
      return;
    }
    if (!button) {
      button = el(
        "button",
        { type: "button", class: "slot", tabindex: "-1", dataset: { slotId: slot.id, start: slot.start }, onclick: () => onPickSlot(slot.id) },
        el("span", { class: "time" }, timeHM(slot.start, zone)),
        el("span", { class: "tag" }),
      );
      const cell = el("div", { role: "gridcell", class: "cell", dataset: { start: slot.start } }, button);
      const next = [...day.children].find((other) => other.dataset.start > slot.start);
      day.insertBefore(cell, next ?? null);
      animate = false; // a new slot simply appears
    }
    renderSlot(button, slot, animate);
  }

  /** Whether one of the patient's own visits is on this slot. */
  function bookedByMe(slotId) {
    for (const appointment of page.appointments.byId.values()) {
      if (appointment.slot_id === slotId && VISIT.has(appointment.status)) return true;
    }
    return false;
  }

  function renderSlot(button, slot, animate) {
    const mine = page.hold.isOn(slot.id);
    const booked = bookedByMe(slot.id);
    const { spoken, tag, bookable, goes } = describeSlot(slot, page.week.calendar, mine, booked);
    const day = dateKey(slot.start, zone);
    const theirZone = doctorZone();
    const theirDay = theirZone ? dateKey(slot.start, theirZone) : day;
    // Its name says the clinic's time too, and the clinic's date when that is another.
    const differs = theirZone && !sameOffset(theirZone, zone, Date.parse(slot.start));
    const theirDate = theirDay === day ? "" : `${dayLong(theirDay)}, `;
    const there = differs ? ` (${theirDate}${timeHM(slot.start, theirZone)} in ${zonePlace(theirZone)})` : "";
    button.dataset.status = slot.status;
    button.dataset.doctorDate = theirDay;
    button.disabled = !bookable;
    button.setAttribute("aria-label", `${dayLong(day)}, ${timeHM(slot.start, zone)}${there}, ${spoken}`);
    button.querySelector(".tag").textContent = tag;
    button.classList.toggle("mine", mine || booked);
    button.classList.toggle("booked-mine", booked);
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
        refreshDays();
      }, LEAVE_MS);
    }
  }

  /** Re-render one slot (the hold moved onto or off it). */
  function rerenderSlot(slotId) {
    const slot = page.week.calendar?.slots.get(slotId);
    const button = document.querySelector(`.slot[data-slot-id="${slotId}"]`);
    if (slot && button) renderSlot(button, slot, false);
    rove();
  }

  /** Re-render every slot (time passes: slots start, the bookable window slides). */
  function refresh() {
    const calendar = page.week.calendar;
    if (!calendar || calendar.version === null) return;
    for (const button of document.querySelectorAll(".slot")) {
      const slot = calendar.slots.get(Number(button.dataset.slotId));
      if (slot) renderSlot(button, slot, false);
    }
    refreshDays();
  }

  /** After any change: each day's "No free times" and date-line mark, and the Tab stop. */
  function refreshDays() {
    const theirZone = doctorZone();
    let shifted = false;
    for (const day of document.querySelectorAll("[data-testid=day]")) {
      const shown = [...day.querySelectorAll(".slot:not(.leaving)")];
      const empty = day.querySelector(".empty");
      empty.hidden = shown.length > 0;
      empty.textContent = "No free times";
      // The clinic's dates of this day's times, when any differs from the patient's:
      // a Tokyo doctor's Tuesday morning is a Los Angeles patient's Monday afternoon.
      const theirs = [...new Set(shown.map((b) => b.dataset.doctorDate))].sort();
      const mark = day.querySelector("[data-testid=day-shift]");
      const differs = theirZone && theirs.some((d) => d !== day.dataset.date);
      mark.hidden = !differs;
      mark.textContent = differs ? `In ${zonePlace(theirZone)}: ${theirs.map(dayShort).join(" and ")}` : "";
      shifted ||= Boolean(differs);
    }
    renderTzNote(theirZone, shifted);
    rove();
  }

  // ---- the keyboard: one Tab stop, arrows inside ------------------------------------------

  /** The slots the keyboard moves between, by day: those that can be held now. */
  function takeable() {
    return [...document.querySelectorAll("[data-testid=day]")].map((day) => [...day.querySelectorAll(".slot:enabled")]);
  }

  /** Give the grid's one Tab stop to the active slot, or the week's first takeable one. */
  function rove() {
    const all = takeable().flat();
    const keep = all.find((b) => Number(b.dataset.slotId) === active);
    const stop = keep ?? all[0] ?? null;
    active = stop ? Number(stop.dataset.slotId) : null;
    for (const button of document.querySelectorAll("[data-testid=calendar] .slot")) {
      button.tabIndex = button === stop ? 0 : -1;
    }
  }

  function focusSlot(button) {
    if (!button) return;
    active = Number(button.dataset.slotId);
    rove();
    button.focus();
  }

  /** After a week change asked for by key or "next available", put the keyboard in the new week. */
  function focusIfAsked() {
    const wanted = focusWhenLoaded;
    focusWhenLoaded = null;
    if (wanted === null) return;
    const target = wanted === "first" ? null : document.querySelector(`.slot[data-slot-id="${wanted}"]:enabled`);
    focusSlot(target ?? takeable().flat()[0] ?? null);
  }

  function onKeyDown(event) {
    const current = event.target.closest?.(".slot");
    if (!current || event.altKey || event.metaKey) return;
    const days = takeable();
    const d = days.findIndex((list) => list.includes(current));
    if (d < 0) return;
    const list = days[d];
    const i = list.indexOf(current);
    let target = null;
    switch (event.key) {
      case "ArrowDown":
        target = list[i + 1];
        break;
      case "ArrowUp":
        target = list[i - 1];
        break;
      case "ArrowRight":
        target = nearestOn(days, d, +1, current);
        break;
      case "ArrowLeft":
        target = nearestOn(days, d, -1, current);
        break;
      case "Home":
        target = event.ctrlKey ? days.flat()[0] : list[0];
        break;
      case "End":
        target = event.ctrlKey ? days.flat().at(-1) : list.at(-1);
        break;
      case "PageDown":
      case "PageUp":
        event.preventDefault();
        if (page.week.move(event.key === "PageDown" ? 7 : -7)) {
          focusWhenLoaded = "first";
          open();
        }
        return;
      default:
        return;
    }
    event.preventDefault(); // the page does not scroll under the arrows
    focusSlot(target ?? current);
  }

  /** The slot on the next day (in `step` direction) with one, nearest in time of day. */
  function nearestOn(days, from, step, current) {
    const at = Date.parse(current.dataset.start);
    for (let d = from + step; d >= 0 && d < days.length; d += step) {
      if (days[d].length === 0) continue;
      const shift = (d - from) * DAY_MS;
      return days[d].reduce((best, b) =>
        Math.abs(Date.parse(b.dataset.start) - shift - at) < Math.abs(Date.parse(best.dataset.start) - shift - at) ? b : best,
      );
    }
    return null;
  }

  const grid = $("[data-testid=calendar]");
  grid.addEventListener("keydown", onKeyDown);
  // A click or a screen reader's own focusing moves the Tab stop too.
  grid.addEventListener("focusin", (event) => {
    const slot = event.target.closest?.(".slot");
    if (slot && !slot.disabled) {
      active = Number(slot.dataset.slotId);
      rove();
    }
  });

  function move(days) {
    if (page.week.move(days)) open();
  }

  /** Show the week with the patient's date `key` and, once loaded, focus slot `slotId` there. */
  function showSlot(key, slotId) {
    focusWhenLoaded = slotId;
    if (page.week.showDate(key)) open();
    else focusIfAsked();
  }

  return { open, watch, onDelta, rerenderSlot, refresh, move, showSlot };
}
