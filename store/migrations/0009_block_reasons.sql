-- slotcast:expand
-- Why the doctor's side blocked a slot (issue 16, item 2; docs/protocol.md, `block_range`).
-- Only an addition: older code never reads it and leaves it null. Shown to staff only
-- (dashboards); patients see the slot as `busy-unavailable`. Names no patient.
ALTER TABLE slots ADD COLUMN block_reason text;
