// The doctor page's schedule card: the editor of the weekly hours, the dates
// with other hours (days off, holidays, extra hours) and the slot rules, with a
// preview of the booked and held appointments a change would leave outside the
// schedule before it is saved; and the form that blocks a whole day (or part of
// one) with a reason. The draft is state (schedule.js: ScheduleDraft); this
// draws it, reads the inputs back into it and sends the commands. Nothing here
// redraws the timeline: the save's and the block's dashboard_delta do, on this
// page and on every other page watching the doctor.

import { dayLong, shortDateTime } from "./format.js";
import { errorCode } from "./messages.js";
import { RULE_WORDS, ScheduleDraft, WEEKDAYS, blockRange } from "./schedule.js";
import { el, showError, showNotice } from "./ui.js";

const $ = (selector) => document.querySelector(selector);

// Words for what these forms in particular can be refused for; the rest is messages.js's.
const REFUSED = {
  outside_horizon: "That range is longer than the days patients can book ahead. Please pick a shorter one.",
  invalid_transition: "That time cannot be blocked any more.",
};

/** `page`: {conn, intentions, doctorId, days, fail}. */
export function scheduleCard(page) {
  const { intentions } = page;
  let draft = null; // ScheduleDraft while the editor is open
  let previewed = null; // the body whose preview is shown, with its conflicts

  const editor = () => $("[data-testid=schedule-editor]");
  const toggle = () => $("#schedule-toggle");
  const zone = () => page.days.zone;

  function fail(error) {
    const code = errorCode(error);
    if (!REFUSED[code]) return page.fail(error);
    showError(code); // the alert, with these forms' own words for it
    $("#messages [data-testid=message] p").textContent = REFUSED[code];
  }

  // ---- the editor ----------------------------------------------------------------------------

  async function openEditor() {
    toggle().disabled = true;
    try {
      const { body } = await page.conn.request("get_schedule", { doctor_id: page.doctorId });
      draft = new ScheduleDraft(body);
      previewed = null;
      toggle().setAttribute("aria-expanded", "true");
      editor().hidden = false;
      render();
      editor().querySelector("input")?.focus();
    } catch (error) {
      fail(error);
    } finally {
      toggle().disabled = false;
    }
  }

  function closeEditor() {
    draft = null;
    previewed = null;
    editor().hidden = true;
    editor().replaceChildren();
    toggle().setAttribute("aria-expanded", "false");
    toggle().focus();
  }

  /** Read every input back into the draft, so that adding a row loses nothing typed. */
  function collect() {
    const form = editor();
    for (const [i, block] of draft.weekly.entries()) {
      block.start = form.querySelector(`#wk-${i}-start`)?.value ?? block.start;
      block.end = form.querySelector(`#wk-${i}-end`)?.value ?? block.end;
    }
    for (const [i, o] of draft.overrides.entries()) {
      o.date = form.querySelector(`#ov-${i}-date`)?.value ?? o.date;
      o.off = (form.querySelector(`#ov-${i}-kind`)?.value ?? (o.off ? "off" : "hours")) === "off";
      o.start = form.querySelector(`#ov-${i}-start`)?.value ?? o.start;
      o.end = form.querySelector(`#ov-${i}-end`)?.value ?? o.end;
    }
    for (const name of Object.keys(draft.rules)) {
      const value = form.querySelector(`#rule-${name}`)?.value;
      if (value !== undefined) draft.rules[name] = value === "" ? NaN : Number(value);
    }
  }

  function change(mutate, focusSelector) {
    collect();
    mutate();
    previewed = null;
    render();
    if (focusSelector) editor().querySelector(focusSelector)?.focus();
  }

  function timeInput(id, value, label) {
    return el("input", { id, type: "time", value, required: true, "aria-label": label, class: "time-input" });
  }

  function render() {
    const weekly = el("fieldset", { class: "sched-group" }, el("legend", {}, "Weekly hours"));
    for (let weekday = 1; weekday <= 7; weekday++) {
      const name = WEEKDAYS[weekday - 1];
      const blocks = el("div", { class: "sched-blocks" });
      for (const block of draft.blocksOn(weekday)) {
        const i = draft.weekly.indexOf(block);
        blocks.append(
          el(
            "div",
            { class: "sched-block", dataset: { weekday } },
            timeInput(`wk-${i}-start`, block.start, `${name} from`),
            el("span", { "aria-hidden": "true" }, "–"),
            timeInput(`wk-${i}-end`, block.end, `${name} until`),
            el(
              "button",
              {
                type: "button",
                class: "btn btn-small btn-quiet",
                "aria-label": `Remove ${name} ${block.start}–${block.end}`,
                onclick: () => change(() => draft.removeBlock(block), `[data-add-weekday="${weekday}"]`),
              },
              "Remove",
            ),
          ),
        );
      }
      if (draft.blocksOn(weekday).length === 0) blocks.append(el("span", { class: "row-note" }, "Closed"));
      weekly.append(
        el(
          "div",
          { class: "sched-day", "data-testid": "weekday", dataset: { weekday } },
          el("span", { class: "sched-day-name" }, name),
          blocks,
          el(
            "button",
            {
              type: "button",
              class: "btn btn-small btn-quiet",
              "aria-label": `Add hours on ${name}`,
              dataset: { addWeekday: weekday },
              onclick: () => change(() => draft.addBlock(weekday), `#wk-${draft.weekly.length}-start`),
            },
            "Add hours",
          ),
        ),
      );
    }

    const dates = el("fieldset", { class: "sched-group" }, el("legend", {}, "Dates with other hours"));
    dates.append(el("p", { class: "row-note" }, "Days off, holidays and extra hours: a date here replaces its weekday's hours."));
    for (const [i, o] of draft.overrides.entries()) {
      const kind = el(
        "select",
        { id: `ov-${i}-kind`, "aria-label": `What ${o.date || "this date"} is`, onchange: () => change(() => {}, `#ov-${i}-kind`) },
        el("option", { value: "off", selected: o.off }, "Day off"),
        el("option", { value: "hours", selected: !o.off }, "Other hours"),
      );
      dates.append(
        el(
          "div",
          { class: "sched-block", "data-testid": "override" },
          el("input", { id: `ov-${i}-date`, type: "date", value: o.date, required: true, "aria-label": "Date" }),
          kind,
          o.off ? null : timeInput(`ov-${i}-start`, o.start, `${o.date} from`),
          o.off ? null : timeInput(`ov-${i}-end`, o.end, `${o.date} until`),
          el(
            "button",
            {
              type: "button",
              class: "btn btn-small btn-quiet",
              "aria-label": `Remove ${o.date || "this date"}`,
              onclick: () => change(() => draft.removeOverride(o), "#add-override"),
            },
            "Remove",
          ),
        ),
      );
    }
    dates.append(
      el(
        "button",
        {
          type: "button",
          id: "add-override",
          class: "btn btn-small btn-quiet",
          onclick: () => change(() => draft.addOverride(page.days.selected), `#ov-${draft.overrides.length}-date`),
        },
        "Add a date",
      ),
    );

    const rules = el("fieldset", { class: "sched-group sched-rules" }, el("legend", {}, "Slots"));
    const limits = { slot_minutes: [5, 480], buffer_minutes: [0, 240], min_notice_minutes: [0, 43200], horizon_days: [1, 366] };
    for (const [name, [min, max]] of Object.entries(limits)) {
      rules.append(
        el(
          "div",
          {},
          el("label", { for: `rule-${name}` }, RULE_WORDS[name]),
          el("input", { id: `rule-${name}`, type: "number", min, max, step: 1, required: true, value: draft.rules[name] }),
        ),
      );
    }

    const result = el("div", { class: "sched-preview", "data-testid": "schedule-preview", role: "status" });
    if (previewed) result.append(...previewWords(previewed.reply));
    const save = el(
      "button",
      { type: "submit", class: "btn btn-primary", "data-testid": "save-schedule" },
      previewed?.reply.total ? "Save anyway" : "Save schedule",
    );
    editor().replaceChildren(
      weekly,
      dates,
      rules,
      result,
      el(
        "div",
        { class: "actions" },
        el("button", { type: "button", class: "btn", onclick: preview }, "Preview changes"),
        save,
        el("button", { type: "button", class: "btn btn-quiet", onclick: closeEditor }, "Close"),
      ),
    );
  }

  function previewWords(reply) {
    if (reply.total === 0) return [el("p", {}, "No booked or held appointment falls outside these hours.")];
    const many = reply.total === 1 ? "1 appointment would" : `${reply.total} appointments would`;
    const list = el("ul", { class: "sched-conflicts", "data-testid": "preview-conflicts" });
    for (const a of reply.conflicts) {
      const who = a.patient_name ?? a.patient_id;
      const what = a.status === "pending" ? "held by" : "booked by";
      list.append(el("li", {}, `${shortDateTime(a.start, zone())}, ${what} ${who}`));
    }
    if (reply.total > reply.conflicts.length) list.append(el("li", {}, `and ${reply.total - reply.conflicts.length} more`));
    return [
      el("p", { class: "sched-warning" }, `${many} fall outside these hours. They stay booked as conflicts until you cancel or reschedule them:`),
      list,
    ];
  }

  /** The body to send, or null after showing what to fix. */
  function currentBody() {
    collect();
    const { problems, body } = draft.body();
    if (problems.length) {
      previewed = null;
      render();
      $("[data-testid=schedule-preview]").replaceChildren(el("p", { class: "sched-warning" }, problems[0]));
      return null;
    }
    return body;
  }

  async function preview() {
    const body = currentBody();
    if (!body) return null;
    try {
      const { body: reply } = await page.conn.request("preview_schedule", body);
      previewed = { key: JSON.stringify(body), reply };
      render();
      return previewed;
    } catch (error) {
      fail(error);
      return null;
    }
  }

  /** Save: previewed first, and saved at once only when nothing would become a conflict. */
  async function save(event) {
    event.preventDefault();
    const body = currentBody();
    if (!body) return;
    const key = JSON.stringify(body);
    if (previewed?.key !== key) {
      const shown = await preview();
      if (!shown || shown.reply.total > 0) return; // the conflicts are shown: "Save anyway" confirms
    }
    const intention = `set_schedule:${key}`;
    try {
      const { body: reply } = await page.conn.request(
        "set_schedule",
        { ...body, idempotency_key: intentions.key(intention) },
        { retry: true },
      );
      intentions.settle(intention);
      const conflicts = reply.conflicts.length ? `, ${reply.conflicts.length} outside the hours` : "";
      showNotice("schedule_saved", `Schedule saved: ${reply.opened} slots opened, ${reply.removed} closed${conflicts}.`);
      closeEditor();
    } catch (error) {
      intentions.settle(intention, error);
      fail(error);
    }
  }

  // ---- blocking a day or part of one ---------------------------------------------------------

  function syncBlockForm() {
    const whole = $("#block-whole").checked;
    for (const id of ["#block-from", "#block-until"]) $(id).disabled = whole;
  }

  async function block(type) {
    const form = $("[data-testid=block-form]");
    const date = $("#block-date").value;
    const wholeDay = $("#block-whole").checked;
    const from = $("#block-from").value;
    const until = $("#block-until").value;
    const reason = $("#block-reason").value.trim();
    const lastKey = $("#block-through").value || null;
    const several = lastKey !== null && lastKey !== date;
    if (!date || (lastKey && lastKey < date) || (!wholeDay && (!from || !until || (!several && from >= until)))) {
      showError("invalid");
      return;
    }
    const range = blockRange(date, { wholeDay, from, until, lastKey }, zone());
    const body = { doctor_id: page.doctorId, ...range };
    if (type === "block_range" && reason) body.reason = reason;
    const intention = `${type}:${JSON.stringify(body)}`;
    for (const button of form.querySelectorAll("button")) button.disabled = true;
    try {
      const { body: reply } = await page.conn.request(type, { ...body, idempotency_key: intentions.key(intention) }, { retry: true });
      intentions.settle(intention);
      const days = several ? `${dayLong(date)} to ${dayLong(lastKey)}` : dayLong(date);
      const when = wholeDay ? days : several ? `${dayLong(date)} ${from} to ${dayLong(lastKey)} ${until}` : `${days}, ${from}–${until}`;
      const n = reply.slots.length;
      const slots = n === 1 ? "1 slot" : `${n} slots`;
      if (type === "block_range") {
        showNotice("blocked", n ? `Blocked ${slots} on ${when}${reason ? ` (${reason})` : ""}. Booked and held times stay.` : `No free time to block on ${when}.`);
      } else {
        showNotice("unblocked", n ? `Opened ${slots} again on ${when}.` : `Nothing was blocked on ${when}.`);
      }
    } catch (error) {
      intentions.settle(intention, error);
      fail(error);
    } finally {
      for (const button of form.querySelectorAll("button")) button.disabled = false;
    }
  }

  /** Wire the card's static parts; `doctorReady` when the doctor's zone is known. */
  function start() {
    toggle().addEventListener("click", () => (draft ? closeEditor() : openEditor()));
    editor().addEventListener("submit", save);
    $("#block-whole").addEventListener("change", syncBlockForm);
    $("#block-date").addEventListener("input", (event) => (event.target.dataset.touched = "1"));
    $("#block-submit").addEventListener("click", () => block("block_range"));
    $("#unblock-submit").addEventListener("click", () => block("unblock_range"));
    $("[data-testid=block-form]").addEventListener("submit", (event) => {
      event.preventDefault();
      block("block_range");
    });
    syncBlockForm();
  }

  /** The block form's date follows the day shown, until the doctor types another. */
  function showDay(date) {
    const input = $("#block-date");
    if (!input.dataset.touched) input.value = date;
  }

  return { start, showDay };
}
