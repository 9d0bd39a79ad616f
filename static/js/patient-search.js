// The patient page's doctor search: the search box, the list of matches and
// which doctor is chosen. The doctors heard of are state (directory.js); this
// asks the server and draws the list.

import { el, reducedMotion } from "./ui.js";

const $ = (selector) => document.querySelector(selector);

/**
 * `page`: {conn, doctors, week, fail}. `onNamed()` runs when a doctor's name
 * arrives that the page may have been showing as "Doctor 7"; `onPick(doctor)`
 * shows that doctor's week.
 */
export function doctorSearch(page, { onNamed, onPick }) {
  let seq = 0; // the latest search sent: older replies are dropped
  let timer = null;

  function remember(doctors) {
    if (page.doctors.remember(doctors)) onNamed();
  }

  /** Load every doctor once: appointments and the address may name one no search has shown. */
  async function loadAll() {
    const { body } = await page.conn.request("search_doctors", { q: null, limit: 100 });
    remember(body.doctors);
    page.doctors.loaded = true;
  }

  function onInput() {
    clearTimeout(timer);
    timer = setTimeout(() => search().catch(() => {}), 200);
  }

  /**
   * Enter in the search box chooses the first match of what is typed now (the
   * search runs at once, not after the typing pause), and takes the keyboard
   * to that doctor's week.
   */
  async function onKeyDown(event) {
    if (event.key !== "Enter" || event.isComposing) return;
    event.preventDefault();
    clearTimeout(timer);
    await search();
    const first = document.querySelector("[data-testid=doctor-results] button.doctor");
    if (!first) return;
    first.click();
    $("#doctor-heading").focus();
  }

  async function search() {
    const q = $("#doctor-q").value.trim();
    const mine = ++seq;
    try {
      const { body } = await page.conn.request("search_doctors", { q: q || null, limit: 20 });
      if (mine !== seq) return; // a newer search was typed meanwhile
      remember(body.doctors);
      renderResults(body.doctors, q);
    } catch (error) {
      if (!page.conn.recover(error)) page.fail(error);
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
              "aria-pressed": String(page.week.doctor?.id === doctor.id),
              dataset: { doctorId: doctor.id },
              onclick: () => {
                onPick(doctor);
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

  /** Press the chosen doctor's button in the list, release the others. */
  function markChosen(doctorId) {
    for (const button of document.querySelectorAll("[data-testid=doctor-results] button")) {
      button.setAttribute("aria-pressed", String(Number(button.dataset.doctorId) === doctorId));
    }
  }

  return { search, loadAll, onInput, onKeyDown, markChosen };
}
