-- A patient's limits (store.tx.Limits), counted under the doctor's lock by every booking
-- and hold: the patient's active appointments, by start. Cancelled rows are left out, so
-- the count reads only what it counts however many holds the patient released before;
-- the cool-down's look-up of one patient's ended holds on a slot uses appointments_slot.
CREATE INDEX appointments_patient_active ON appointments (patient_id, starts_at)
    WHERE status IN ('pending', 'booked', 'arrived');
