"""Stable error codes: the part of an error a client may branch on.

Codes never change meaning once published; messages are for humans and may.
Every layer raises `SlotcastError` (or a subclass) so the server can turn any
failure into the same error reply without knowing where it came from.
"""

from enum import StrEnum


class ErrorCode(StrEnum):
    # Malformed or unacceptable input; the connection stays usable.
    BAD_MESSAGE = "bad_message"
    UNKNOWN_TYPE = "unknown_type"
    INVALID = "invalid"
    TOO_LARGE = "too_large"
    # Identity and permission.
    UNAUTHENTICATED = "unauthenticated"
    TOKEN_INVALID = "token_invalid"
    TOKEN_EXPIRED = "token_expired"
    FORBIDDEN = "forbidden"
    # Scheduling outcomes a client acts on.
    NOT_FOUND = "not_found"
    SLOT_TAKEN = "slot_taken"
    SLOT_UNAVAILABLE = "slot_unavailable"
    TOO_LATE = "too_late"
    OUTSIDE_HORIZON = "outside_horizon"
    HOLD_EXPIRED = "hold_expired"
    NOT_HOLDER = "not_holder"
    HOLD_LIMIT = "hold_limit"
    APPOINTMENT_LIMIT = "appointment_limit"
    COOLDOWN = "cooldown"
    INVALID_TRANSITION = "invalid_transition"
    TOO_EARLY = "too_early"
    DOCTOR_RETIRED = "doctor_retired"
    IDEMPOTENCY_CONFLICT = "idempotency_conflict"
    LIMIT_EXCEEDED = "limit_exceeded"
    # Too many requests too fast: wait `retry_after_ms`, then try again.
    RATE_LIMITED = "rate_limited"
    # Transient: retry with the same idempotency key.
    BUSY = "busy"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class SlotcastError(Exception):
    """An error with a stable code, raised anywhere and reported to the client as is."""

    code: ErrorCode = ErrorCode.INTERNAL
    # When the server knows how long a retry must wait (rate limits), in milliseconds.
    retry_after_ms: int | None = None

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code.value


class RateLimited(SlotcastError):
    """A budget is spent: the same request would be accepted after `retry_after_ms`."""

    code = ErrorCode.RATE_LIMITED

    def __init__(self, message: str, *, retry_after_ms: int) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class ProtocolError(SlotcastError):
    """The client sent something we cannot decode or accept.

    Carries the request id when the frame was readable enough to have one, so the
    error reply can still be correlated with the request that caused it.
    """

    code = ErrorCode.BAD_MESSAGE

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode | None = None,
        request_id: str | int | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.request_id = request_id
