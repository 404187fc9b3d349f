"""The ``email`` connector: send mail through an SMTP server with aiosmtplib.

Settings: ``host``, ``port`` (default 587 with ``starttls``, 465 with ``tls``, else 25),
``starttls`` / ``tls``, ``username`` and ``password`` (never logged), ``from`` and ``timeout``.

Operation ``send`` (the only action): ``to`` and ``cc`` (a template, or a list of templates;
commas separate several addresses), ``subject`` and ``body`` (templates), ``html`` (true: the body
is HTML). It returns ``{message_id, accepted}``. A permanent refusal (5xx, a rejected recipient)
is a non-retryable ``EmailRejected``; a connection problem or a temporary (4xx) refusal is a
retryable ``EmailError``.
"""

from __future__ import annotations

import email.utils
from email.message import EmailMessage
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

try:
    import aiosmtplib
except ModuleNotFoundError as exc:  # name the extra to install rather than the missing module
    raise ModuleNotFoundError("the email connector needs the email extra: pip install 'kflow[email]'",
                              name=exc.name) from exc

from kflow.connectors.base import Connector, ConnectorError, ConnectorSpec, Operation, connector_type
from kflow.connectors.config import Duration, Template, parse_settings

__all__ = ["EmailConnector"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class EmailSettings(_Model):
    """Settings of an ``email`` connector."""

    host: str = Field(min_length=1)
    port: int | None = Field(None, ge=1, le=65535)
    starttls: bool = False
    tls: bool = False
    username: str | None = None
    password: str | None = None
    from_: str = Field(alias="from", min_length=3)
    timeout: Duration = 30.0


class _Operation(_Model):
    action: str = Field("send", pattern="^send$")
    to: str | list[str]
    cc: str | list[str] = Field(default_factory=list)
    subject: str = ""
    body: str = ""
    html: bool = False


def _templates(value: str | list[str], where: str) -> list[Template]:
    items = [value] if isinstance(value, str) else value
    return [Template(v, f"{where}[{i}]") for i, v in enumerate(items)]


class _Compiled:
    def __init__(self, name: str, op: _Operation, where: str) -> None:
        self.name, self.op = name, op
        self.to = _templates(op.to, f"{where}.to")
        self.cc = _templates(op.cc, f"{where}.cc")
        self.subject = Template(op.subject, f"{where}.subject")
        self.body = Template(op.body, f"{where}.body")


def _addresses(templates: list[Template], scope: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for t in templates:
        out += [a.strip() for a in t.render(scope).split(",") if a.strip()]
    return out


@connector_type
class EmailConnector(Connector):
    """Sends templated mail through one SMTP server (a connection per message)."""

    type = "email"

    def __init__(self, spec: ConnectorSpec) -> None:
        super().__init__(spec)
        self.settings: EmailSettings = parse_settings(EmailSettings, spec.settings, spec)
        self._ops = {name: _Compiled(name, parse_settings(_Operation, decl, spec, f"operation '{name}'"),
                                     f"connector '{spec.name}' operation '{name}'")
                     for name, decl in spec.operations.items()}
        self._connected = False

    def _client(self) -> aiosmtplib.SMTP:
        s = self.settings
        port = s.port or (465 if s.tls else 587 if s.starttls else 25)
        return aiosmtplib.SMTP(hostname=s.host, port=port, use_tls=s.tls, start_tls=s.starttls if not s.tls else False,
                               username=s.username, password=str(s.password) if s.password is not None else None,
                               timeout=s.timeout)

    async def connect(self) -> None:
        client = self._client()
        try:
            await client.connect()
            await client.noop()
        except (aiosmtplib.SMTPException, OSError) as e:
            raise ConnectorError("EmailError", f"cannot reach SMTP server {self.settings.host}: {e}") from None
        finally:
            if client.is_connected:
                await client.quit()
        self._connected = True

    async def disconnect(self) -> None:
        self._connected = False

    async def health(self) -> bool:
        return self._connected

    def operations(self) -> dict[str, Operation]:
        return {name: self._operation(c) for name, c in self._ops.items()}

    def _operation(self, c: _Compiled) -> Operation:
        async def run(input: Any) -> Any:
            scope = {"input": input}
            to, cc = _addresses(c.to, scope), _addresses(c.cc, scope)
            what = f"connector '{self.name}' operation '{c.name}'"
            if not to:
                raise ConnectorError("EmailRejected", f"{what}: no recipient", retryable=False)
            msg = EmailMessage()
            msg["From"] = self.settings.from_
            msg["To"] = ", ".join(to)
            if cc:
                msg["Cc"] = ", ".join(cc)
            msg["Subject"] = c.subject.render(scope)
            msg["Date"] = email.utils.formatdate(localtime=False)
            domain = self.settings.from_.rsplit("@", 1)[-1].strip("> ") or None
            msg["Message-ID"] = message_id = email.utils.make_msgid(domain=domain)
            msg.set_content(c.body.render(scope), subtype="html" if c.op.html else "plain")
            client = self._client()
            try:
                async with client:
                    errors, _response = await client.send_message(msg)
            except aiosmtplib.SMTPRecipientsRefused as e:
                raise ConnectorError("EmailRejected", f"{what}: recipients refused: "
                                     f"{', '.join(r.recipient for r in e.recipients)}", retryable=False) from None
            except aiosmtplib.SMTPResponseException as e:
                permanent = 500 <= e.code < 600
                raise ConnectorError("EmailRejected" if permanent else "EmailError",
                                     f"{what}: {e.code} {e.message}", retryable=not permanent) from None
            except (aiosmtplib.SMTPException, OSError) as e:
                raise ConnectorError("EmailError", f"{what}: {type(e).__name__}: {e}", retryable=True) from None
            accepted = [a for a in to + cc if a not in errors]
            return {"message_id": message_id, "accepted": accepted}

        return run
