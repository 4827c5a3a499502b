"""OpenAI's files and fine-tuning endpoints, onto the router's ``FineTune`` proxy.

Files live in the gateway's folder (``--files-dir``, default ``$LLMCLUSTER_HOME/files``):
``<file_id>.jsonl`` and ``<file_id>.json`` (its metadata), written atomically once the
upload is checked, so a rejected upload leaves nothing behind. A job is created with
the file's text inline (``dataset_jsonl``): the worker that takes it needs no access to
the router's disk. Job state stays in the FineTune service; the gateway translates.

Which training file a job came from travels in the job's ``client_token``
(``<file_id>:<nonce>``), the one field of ours the worker keeps verbatim.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from pydantic import Field

from common.pb import finetune_pb2
from router.gateway import BodyTooLarge, StreamPump, call_context
from router.openai_api import ApiError, RequestBody

if TYPE_CHECKING:
    from router.gateway import Gateway

FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")
FILE_PURPOSE = "fine-tune"
EVENTS_IDLE_S = 0.3
"""Listing events reads the job's replay: once no event came for this long, the past is
read (the worker sends it in one burst) and the rest would be live events."""
EVENTS_FIRST_S = 10.0

_STATUS = {
    finetune_pb2.QUEUED: "queued",
    finetune_pb2.RUNNING: "running",
    finetune_pb2.SUCCEEDED: "succeeded",
    finetune_pb2.FAILED: "failed",
    finetune_pb2.CANCELLED: "cancelled",
}
# Our Hyperparameters fields a caller may set besides OpenAI's own (extensions).
_OWN_HYPERPARAMETERS = {f.name for f in finetune_pb2.Hyperparameters.DESCRIPTOR.fields} - {
    "epochs",
    "learning_rate",
}


class FileStore:
    """Uploaded JSONL files under one folder (see module docstring)."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes

    def _paths(self, file_id: str) -> tuple[Path, Path]:
        if not FILE_ID.match(file_id):
            raise ApiError(404, f"no such file: {file_id!r}", param="file_id", code="not_found")
        return self.folder / f"{file_id}.jsonl", self.folder / f"{file_id}.json"

    def save(self, data: bytes, filename: str) -> dict[str, Any]:
        """Checks ``data`` (UTF-8 JSONL, one object a line, within the size limit) and
        stores it; raises a 400 naming the first bad line, writing nothing."""
        if len(data) > self.max_bytes:
            raise ApiError(
                413, f"file is {len(data)} bytes; the limit is {self.max_bytes}", param="file"
            )
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ApiError(400, f"file is not UTF-8 text: {exc}", param="file") from None
        rows = 0
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ApiError(
                    400, f"line {number}: invalid JSON: {exc.msg} (column {exc.colno})",
                    param="file",
                ) from None  # fmt: skip
            if not isinstance(row, dict):
                raise ApiError(
                    400, f"line {number}: expected a JSON object, got {type(row).__name__}",
                    param="file",
                )  # fmt: skip
            rows += 1
        if rows == 0:
            raise ApiError(400, "file has no JSONL rows", param="file")
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        meta = {
            "id": file_id,
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": os.path.basename(filename or "data.jsonl"),
            "purpose": FILE_PURPOSE,
            "status": "processed",
            "status_details": None,
        }
        data_path, meta_path = self._paths(file_id)
        self.folder.mkdir(parents=True, exist_ok=True)
        for path, content in ((data_path, data), (meta_path, json.dumps(meta).encode())):
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_bytes(content)
            os.replace(tmp, path)  # the metadata last: a listed file is complete
        return meta

    def get(self, file_id: str) -> dict[str, Any]:
        _, meta_path = self._paths(file_id)
        try:
            return dict(json.loads(meta_path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise ApiError(
                404, f"no such file: {file_id!r}", param="file_id", code="not_found"
            ) from None

    def text(self, file_id: str) -> str:
        self.get(file_id)
        data_path, _ = self._paths(file_id)
        return data_path.read_text(encoding="utf-8")

    def list(self) -> list[dict[str, Any]]:
        if not self.folder.is_dir():
            return []
        items = []
        for path in self.folder.glob("file-*.json"):
            with contextlib.suppress(OSError, ValueError):
                items.append(json.loads(path.read_text(encoding="utf-8")))
        return sorted(items, key=lambda m: (m["created_at"], m["id"]), reverse=True)

    def delete(self, file_id: str) -> dict[str, Any]:
        self.get(file_id)
        data_path, meta_path = self._paths(file_id)
        meta_path.unlink(missing_ok=True)
        data_path.unlink(missing_ok=True)
        return {"id": file_id, "object": "file", "deleted": True}


class Supervised(RequestBody):
    hyperparameters: dict[str, Any] | None = None


class MethodIn(RequestBody):
    type: str = "supervised"
    supervised: Supervised | None = None


class JobCreate(RequestBody):
    """``POST /v1/fine_tuning/jobs``."""

    training_file: str
    model: str = ""
    validation_file: str | None = None
    suffix: str | None = Field(None, max_length=64)
    seed: int | None = Field(None, ge=0)
    hyperparameters: dict[str, Any] | None = None
    method: MethodIn | None = None


def _auto(value: Any) -> bool:
    return value is None or value == "auto"


def _hyperparameters(body: JobCreate) -> finetune_pb2.Hyperparameters:
    """OpenAI's hyperparameters (``auto`` = our default) plus our own field names."""
    given: dict[str, Any] = dict(body.hyperparameters or {})
    if body.method is not None:
        if body.method.type != "supervised":
            raise ApiError(
                400, f"method.type {body.method.type!r} is not supported; use 'supervised'",
                param="method.type",
            )  # fmt: skip
        if body.method.supervised and body.method.supervised.hyperparameters:
            given.update(body.method.supervised.hyperparameters)
    hp = finetune_pb2.Hyperparameters()
    try:
        if not _auto(given.get("n_epochs")):
            hp.epochs = int(given["n_epochs"])
        if not _auto(given.get("batch_size")):
            hp.batch_size = int(given["batch_size"])
        if (
            not _auto(given.get("learning_rate_multiplier"))
            and float(given["learning_rate_multiplier"]) != 1.0
        ):
            raise ApiError(
                400, "learning_rate_multiplier other than 'auto' or 1 is not supported; set "
                "hyperparameters.learning_rate (our extension) instead",
                param="hyperparameters.learning_rate_multiplier",
            )  # fmt: skip
        if "learning_rate" in given:
            hp.learning_rate = float(given["learning_rate"])
        for name in _OWN_HYPERPARAMETERS & given.keys() - {"batch_size"}:
            value = given[name]
            field = finetune_pb2.Hyperparameters.DESCRIPTOR.fields_by_name[name]
            if field.is_repeated:
                getattr(hp, name).extend(str(v) for v in value)
            elif field.type == field.TYPE_STRING:
                setattr(hp, name, str(value))
            elif field.type in (field.TYPE_DOUBLE, field.TYPE_FLOAT):
                setattr(hp, name, float(value))
            else:
                setattr(hp, name, int(value))
    except ApiError:
        raise
    except (TypeError, ValueError) as exc:
        raise ApiError(400, f"hyperparameters: {exc}", param="hyperparameters") from None
    if body.seed is not None:
        hp.seed = body.seed
    return hp


def _seconds(unix_ms: int) -> int | None:
    return unix_ms // 1000 if unix_ms else None


def job_object(job: finetune_pb2.Job) -> dict[str, Any]:
    """An OpenAI ``fine_tuning.job`` for one of our jobs."""
    hp = job.hyperparameters
    status = _STATUS.get(job.state, "validating_files")
    training_file = (
        job.client_token.split(":", 1)[0]
        if FILE_ID.match(job.client_token.split(":", 1)[0])
        else None
    )
    estimated = None
    m = job.latest_metrics
    if status == "running" and job.started_unix_ms and m.step and m.total_steps > m.step:
        elapsed_s = time.time() - job.started_unix_ms / 1000
        estimated = int(time.time() + elapsed_s / m.step * (m.total_steps - m.step))
    trained_tokens = None
    if status == "succeeded" and job.started_unix_ms and job.finished_unix_ms:
        duration_s = (job.finished_unix_ms - job.started_unix_ms) / 1000
        trained_tokens = int(m.tokens_per_second * duration_s) if m.tokens_per_second else None
    hyperparameters = {
        "n_epochs": hp.epochs if hp.HasField("epochs") else "auto",
        "batch_size": hp.batch_size if hp.HasField("batch_size") else "auto",
        "learning_rate_multiplier": "auto",
    }
    return {
        "id": job.job_id,
        "object": "fine_tuning.job",
        "created_at": _seconds(job.created_unix_ms) or 0,
        "finished_at": _seconds(job.finished_unix_ms),
        "model": job.base_model,
        "fine_tuned_model": job.artifact.ref or None,
        "organization_id": "llmcluster",
        "status": status,
        "hyperparameters": hyperparameters,
        "training_file": training_file,
        "validation_file": None,
        "result_files": [],
        "trained_tokens": trained_tokens,
        "error": (
            {"code": "job_failed", "message": job.error, "param": None}
            if status == "failed"
            else None
        ),
        "seed": hp.seed if hp.HasField("seed") else 0,
        "estimated_finish": estimated,
        "integrations": [],
        "user_provided_suffix": job.output_name,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
    }


def _event_object(event: finetune_pb2.JobEvent) -> dict[str, Any]:
    kind = event.WhichOneof("event")
    level, type_, message = "info", "message", ""
    data: dict[str, Any] | None = None
    if kind == "state_change":
        state = _STATUS.get(event.state_change.state, "validating_files")
        message = f"Job {state}" + (
            f": {event.state_change.message}" if event.state_change.message else ""
        )
        level = "error" if state == "failed" else "info"
    elif kind == "metrics":
        m = event.metrics
        type_ = "metrics"
        data = {"step": m.step, "total_steps": m.total_steps, "train_loss": m.loss,
                "epoch": m.epoch, "learning_rate": m.learning_rate}  # fmt: skip
        message = f"Step {m.step}/{m.total_steps}: training loss={m.loss:.4f}"
    elif kind == "evaluation":
        e = event.evaluation
        type_ = "metrics"
        data = {"stage": e.stage, "step": e.step, "valid_loss": e.eval_loss,
                "perplexity": e.perplexity}  # fmt: skip
        message = f"Evaluation ({e.stage}): loss={e.eval_loss:.4f}"
    elif kind == "checkpoint":
        message = f"Checkpoint saved at step {event.checkpoint.step}"
    elif kind == "artifact":
        message = f"New fine-tuned model created: {event.artifact.ref}"
    elif kind == "log":
        message = event.log
    return {
        "object": "fine_tuning.job.event",
        "id": f"ftevent-{event.job_id}-{event.sequence}",
        "created_at": event.time_unix_ms // 1000,
        "level": level,
        "message": message,
        "type": type_,
        "data": data,
    }


def _page(items: list[dict[str, Any]], after: str | None, limit: int) -> dict[str, Any]:
    """OpenAI's cursor page: the items after the one with id ``after``, at most ``limit``."""
    if after:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit}


def _limit(request: Request, default: int = 20) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= 100:
        raise ApiError(400, f"limit must be an integer in [1, 100], got {raw!r}", param="limit")
    return int(raw)


class FineTuningApi:
    """``/v1/files`` and ``/v1/fine_tuning/jobs`` over the gateway's FineTune proxy."""

    def __init__(self, gateway: Gateway, files_dir: Path, max_file_bytes: int) -> None:
        self.gateway = gateway
        self.files = FileStore(files_dir, max_file_bytes)

    def add_routes(self, app: FastAPI) -> None:
        add = app.add_api_route
        add("/v1/files", self.upload_file, methods=["POST"])
        add("/v1/files", self.list_files, methods=["GET"])
        add("/v1/files/{file_id}", self.get_file, methods=["GET"])
        add("/v1/files/{file_id}/content", self.file_content, methods=["GET"])
        add("/v1/files/{file_id}", self.delete_file, methods=["DELETE"])
        add("/v1/fine_tuning/jobs", self.create_job, methods=["POST"])
        add("/v1/fine_tuning/jobs", self.list_jobs, methods=["GET"])
        add("/v1/fine_tuning/jobs/{job_id}", self.get_job, methods=["GET"])
        add("/v1/fine_tuning/jobs/{job_id}/cancel", self.cancel_job, methods=["POST"])
        add("/v1/fine_tuning/jobs/{job_id}/events", self.list_events, methods=["GET"])
        add("/v1/fine_tuning/jobs/{job_id}/checkpoints", self.list_checkpoints, methods=["GET"])

    # ---- files ----------------------------------------------------------------------------

    async def upload_file(self, request: Request) -> dict[str, Any]:
        async def body() -> dict[str, Any]:
            try:
                form = await request.form(max_files=1, max_fields=8)
            except BodyTooLarge:
                raise  # BodyLimit answers 413
            except Exception as exc:  # malformed multipart
                raise ApiError(400, f"expected a multipart/form-data body: {exc}") from None
            purpose = form.get("purpose")
            if purpose != FILE_PURPOSE:
                raise ApiError(
                    400, f"purpose must be {FILE_PURPOSE!r}, got {purpose!r}", param="purpose"
                )
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise ApiError(400, "file is required (a multipart file field)", param="file")
            data = await upload.read()
            return await asyncio.to_thread(self.files.save, data, upload.filename or "")

        return await self.gateway.run("files.create", request, "/v1/files", body)

    async def list_files(self, request: Request) -> dict[str, Any]:
        async def body() -> dict[str, Any]:
            items = await asyncio.to_thread(self.files.list)
            return {"object": "list", "data": items, "has_more": False}

        return await self.gateway.run("files.list", request, "/v1/files", body)

    async def get_file(self, file_id: str, request: Request) -> dict[str, Any]:
        async def body() -> dict[str, Any]:
            return await asyncio.to_thread(self.files.get, file_id)

        return await self.gateway.run("files.retrieve", request, "/v1/files/{file_id}", body)

    async def file_content(self, file_id: str, request: Request) -> Any:
        from fastapi.responses import PlainTextResponse

        async def body() -> Any:
            return PlainTextResponse(await asyncio.to_thread(self.files.text, file_id))

        return await self.gateway.run("files.content", request, "/v1/files/{file_id}/content", body)

    async def delete_file(self, file_id: str, request: Request) -> dict[str, Any]:
        async def body() -> dict[str, Any]:
            return await asyncio.to_thread(self.files.delete, file_id)

        return await self.gateway.run("files.delete", request, "/v1/files/{file_id}", body)

    # ---- jobs -----------------------------------------------------------------------------

    async def create_job(self, request: Request) -> dict[str, Any]:
        async def body() -> dict[str, Any]:
            from router.gateway import _json_body, _validation_error

            try:
                job = JobCreate.model_validate(await _json_body(request))
            except ValueError as exc:
                if hasattr(exc, "errors"):
                    raise _validation_error(exc) from None  # type: ignore[arg-type]
                raise
            if job.validation_file:
                raise ApiError(
                    400, "validation_file is not supported yet: jobs hold out part of "
                    "training_file for evaluation (hyperparameters.eval_fraction)",
                    param="validation_file",
                )  # fmt: skip
            try:
                dataset = await asyncio.to_thread(self.files.text, job.training_file)
            except ApiError as exc:
                raise ApiError(400, exc.message, param="training_file") from None
            pb = finetune_pb2.CreateJobRequest(
                base_model=job.model,
                method=finetune_pb2.LORA,
                output_name=job.suffix or f"ft-{uuid.uuid4().hex[:8]}",
                dataset_jsonl=dataset,
                hyperparameters=_hyperparameters(job),
                client_token=f"{job.training_file}:{uuid.uuid4().hex}",
            )
            created = await self.gateway.finetune.CreateJob(pb, call_context(request))
            return job_object(created)

        return await self.gateway.run(
            "fine_tuning.jobs.create", request, "/v1/fine_tuning/jobs", body
        )

    async def list_jobs(self, request: Request) -> dict[str, Any]:
        async def body() -> dict[str, Any]:
            limit = _limit(request)
            reply = await self.gateway.finetune.ListJobs(
                finetune_pb2.ListJobsRequest(), call_context(request)
            )
            items = [job_object(j) for j in reply.jobs]
            return _page(items, request.query_params.get("after"), limit)

        return await self.gateway.run(
            "fine_tuning.jobs.list", request, "/v1/fine_tuning/jobs", body
        )

    async def get_job(self, job_id: str, request: Request) -> dict[str, Any]:
        async def body() -> dict[str, Any]:
            job = await self.gateway.finetune.GetJob(
                finetune_pb2.GetJobRequest(job_id=job_id), call_context(request)
            )
            return job_object(job)

        return await self.gateway.run(
            "fine_tuning.jobs.retrieve", request, "/v1/fine_tuning/jobs/{job_id}", body
        )

    async def cancel_job(self, job_id: str, request: Request) -> dict[str, Any]:
        async def body() -> dict[str, Any]:
            job = await self.gateway.finetune.CancelJob(
                finetune_pb2.CancelJobRequest(job_id=job_id), call_context(request)
            )
            return job_object(job)

        return await self.gateway.run(
            "fine_tuning.jobs.cancel", request, "/v1/fine_tuning/jobs/{job_id}/cancel", body
        )

    async def _past_events(self, job_id: str, request: Request) -> list[finetune_pb2.JobEvent]:
        """The job's events so far (its replay), oldest first."""
        # Pumped: wait_for runs each step in a task of its own, and the proxy's span must
        # be entered and left by one task.
        events = StreamPump(
            self.gateway.finetune.WatchJob(
                finetune_pb2.WatchJobRequest(job_id=job_id), call_context(request)
            )
        )
        out: list[finetune_pb2.JobEvent] = []
        try:
            while True:
                try:
                    event = await asyncio.wait_for(
                        events.next(), EVENTS_FIRST_S if not out else EVENTS_IDLE_S
                    )
                except TimeoutError:
                    return out
                if event is None:
                    return out
                out.append(event)
        finally:
            await events.close()

    async def list_events(self, job_id: str, request: Request) -> dict[str, Any]:
        async def body() -> dict[str, Any]:
            limit = _limit(request)
            events = await self._past_events(job_id, request)
            items = [_event_object(e) for e in reversed(events)]  # newest first, as OpenAI
            return _page(items, request.query_params.get("after"), limit)

        return await self.gateway.run(
            "fine_tuning.jobs.list_events", request, "/v1/fine_tuning/jobs/{job_id}/events", body
        )

    async def list_checkpoints(self, job_id: str, request: Request) -> dict[str, Any]:
        async def body() -> dict[str, Any]:
            limit = _limit(request, default=10)
            events = await self._past_events(job_id, request)
            latest_loss: float | None = None
            items = []
            for e in events:
                if e.WhichOneof("event") == "metrics":
                    latest_loss = e.metrics.loss
                elif e.WhichOneof("event") == "checkpoint":
                    items.append(
                        {
                            "object": "fine_tuning.job.checkpoint",
                            "id": f"ftckpt-{job_id}-{e.checkpoint.step}",
                            "created_at": e.time_unix_ms // 1000,
                            "fine_tuned_model_checkpoint": f"{job_id}:step-{e.checkpoint.step}",
                            "step_number": e.checkpoint.step,
                            "metrics": {"step": e.checkpoint.step, "train_loss": latest_loss},
                            "fine_tuning_job_id": job_id,
                        }
                    )
            return _page(list(reversed(items)), request.query_params.get("after"), limit)

        return await self.gateway.run(
            "fine_tuning.jobs.checkpoints.list",
            request,
            "/v1/fine_tuning/jobs/{job_id}/checkpoints",
            body,
        )
