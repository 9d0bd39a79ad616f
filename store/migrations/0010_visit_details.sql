-- slotcast:expand
-- Visit details (issue 16, item 4; docs/protocol.md, "Visit details"). Only additions.

-- Why the patient comes, given when booking (by the patient, or by whoever books for
-- them), and how the clinic reaches a patient who phoned in: shown to the doctor, the
-- front desk and in webhook payloads, never to another patient; erasure clears both.
-- The protocol bounds them (300 and 120 characters); the checks keep any other writer
-- to the same bounds.
ALTER TABLE appointments
    ADD COLUMN visit_reason text CHECK (char_length(visit_reason) <= 300),
    ADD COLUMN patient_contact text CHECK (char_length(patient_contact) <= 120);
