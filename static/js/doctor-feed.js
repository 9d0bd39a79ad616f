// The doctor page's live feed: one line per change to the calendar, newest
// first, the last FEED_LIMIT kept. The words are feed.js's.

import { feedText } from "./feed.js";
import { browserZone, timeHM } from "./format.js";
import { el, reducedMotion } from "./ui.js";

const FEED_LIMIT = 50;

const $ = (selector) => document.querySelector(selector);

/** `page`: {days}. */
export function liveFeed(page) {
  function add(delta) {
    const feed = $("[data-testid=feed]");
    $("#feed-empty").hidden = true;
    const item = el(
      "li",
      { class: reducedMotion() ? "" : "fresh", dataset: { version: delta.version } },
      feedText(delta, page.days.zone, page.days.today),
      " ",
      el("span", { class: "feed-when" }, `at ${timeHM(Date.now(), browserZone())}`),
    );
    feed.prepend(item);
    while (feed.children.length > FEED_LIMIT) feed.lastElementChild.remove();
  }

  return { add };
}
