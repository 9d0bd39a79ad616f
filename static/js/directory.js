// The doctors the patient page has heard of, as pure state (no DOM, no
// socket): from searches, from the full list loaded when an appointment or the
// address names a doctor not yet seen. A doctor known only by id reads as
// "Doctor 7" until their name arrives.

export class Doctors {
  constructor() {
    this.byId = new Map(); // id -> {id, name, specialty, timezone}
    this.loaded = false; // whether the full list was loaded once
  }

  /** Keep doctors we hear about. True when one was new: something may have been waiting for its name. */
  remember(doctors) {
    const named = doctors.some((doctor) => !this.byId.has(doctor.id));
    for (const doctor of doctors) this.byId.set(doctor.id, doctor);
    return named;
  }

  has(id) {
    return this.byId.has(id);
  }

  name(id) {
    return this.byId.get(id)?.name ?? `Doctor ${id}`;
  }

  /** The doctor with this id, or a stand-in with only the id (e.g. from the page's address). */
  byIdOrStandIn(id) {
    return this.byId.get(id) ?? { id, name: `Doctor ${id}`, specialty: "", timezone: null };
  }
}
