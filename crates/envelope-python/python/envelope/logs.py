"""JSON log lines with the sidecar's access-log fields.

`JsonFormatter` renders each record as one JSON object: `ts_ms`, `level`, `logger`, `message`, the `request_id` of
the request being handled (see `envelope.asgi.REQUEST_ID`), the exception when there is one — and, for the access
records the ASGI middleware writes to the `envelope.access` logger, the sidecar's access-log fields: `request_id`,
`listener`, `route`, `method`, `status`, `duration_ms`, `outcome`. Header values are never logged.

    handler = logging.StreamHandler()
    handler.setFormatter(envelope.logs.JsonFormatter())
    logging.getLogger("envelope.access").addHandler(handler)
"""

from __future__ import annotations

import json
import logging
from typing import Any

ACCESS_FIELDS = ("request_id", "listener", "route", "method", "status", "duration_ms", "outcome")


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docs)."""

    def format(self, record: logging.LogRecord) -> str:
        from .asgi import REQUEST_ID

        line: dict[str, Any] = {
            "ts_ms": int(record.created * 1000),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or REQUEST_ID.get()
        if request_id and request_id != "-":
            line["request_id"] = request_id
        access = getattr(record, "envelope_access", None)
        if isinstance(access, dict):
            line.update({k: access[k] for k in ACCESS_FIELDS if k in access})
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)
