"""The router: one request's path from validation through placement to its token stream.

A `Router` runs inside whatever event loop calls `start` (a test's, or `serve`'s), so
end-to-end tests can start one beside Ray workers and talk to it over gRPC on the port that
`start` returns.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

from pdserve.api.block_hash import block_hashes, blocks_for
from pdserve.api.errors import CapacityExceeded, NotFound
from pdserve.api.messages import PrefillRequest, TokenDelta
from pdserve.api.tokenizer import Tokenizer
from pdserve.proto import pdserve_pb2 as pb
from pdserve.router import failover
from pdserve.router.admission import Admission
from pdserve.router.auth import ServerTLS
from pdserve.router.errors import RequestFailed
from pdserve.router.http import HttpServer, start_http
from pdserve.router.index import RadixIndex
from pdserve.router.kv_feed import ActorKVSource, KVFeed
from pdserve.router.logs import REQUEST_ID
from pdserve.router.metrics import RouterMetrics
from pdserve.router.placement import Assignment, Demand, Placer
from pdserve.router.registry import Worker, WorkerRegistry
from pdserve.router.request_table import FinishedRequest, RequestTable
from pdserve.router.responses import ResponseBuilder
from pdserve.router.server import RunningServer, start_server
from pdserve.router.status import STATUS_TIMEOUT_S, cluster_status
from pdserve.router.streams import DecodeStreams, Event, Failure
from pdserve.router.validation import (
    MAX_REQUEST_ID_LEN,
    ValidRequest,
    check_text_size,
    validate,
)

logger = logging.getLogger(__name__)

LONG_INPUT_BYTES = 8192
# Threads that tokenize long inputs: requests beyond them wait their turn, and validation bounds
# each input by the context before it is tokenized, so no input holds one for long.
TOKENIZER_THREADS = 2
ABORT_CHECK_S = 0.25  # how often a request waiting for a decode worker checks for an abort

Send = Callable[[pb.GenerateResponse], Awaitable[None]]


@dataclass(eq=False)
class _InFlight:
    """`attempt_id` is what workers see: unique per attempt, so a client that reuses its
    request id (a retry) never meets the deltas or aborts of the earlier attempt. `owner`
    names the API key that created the request ("" without keys); ids are unique per owner."""

    owner: str
    request_id: str
    attempt_id: str
    assignment: Assignment
    queue: asyncio.Queue[Event]
    prefill: asyncio.Task[None] | None = None
    # Set once the decode worker sent the request's final delta (its blocks are free).
    decode_finished: bool = False
    # Set once the router asked both workers to abort (by the Abort RPC or on the way out).
    aborted: bool = False
    # Set by the Abort RPC (which a request waiting for a decode worker to fail over to heeds).
    abort_requested: bool = False
    # Set once the attempt's state is dropped (`_end_attempt`).
    ended: bool = False


@dataclass(eq=False)
class _Queued:
    """A request waiting for KV blocks (`admission` returns once they are charged to it);
    `aborted` once the Abort RPC ended its wait."""

    admission: asyncio.Task[None]
    aborted: bool = False


class Router:
    """Serves `pdserve.v1.Generation` over the given workers (Ray actor handles by id)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prefill: Mapping[str, Any],
        decode: Mapping[str, Any],
        *,
        vocab_size: int,
        max_model_len: int,
        policy: str = "cache_aware",
        max_inflight: int = 1024,
        max_queued: int = 1024,
        model_name: str = "",
        block_size: int = 16,
        salt: int = 0,
        cache_weight: float = 2.0,
        local_prefill_max_tokens: int = 256,
        request_table_size: int = 10_000,
        request_table_ttl_s: float = 600.0,
        restart_backoff_s: float = 0.2,
        restart_max_backoff_s: float = 5.0,
        stall_timeout_s: float = 120.0,
    ) -> None:
        """`block_size` and `salt` must be the workers' (`pdserve.api.block_hash`), so that
        the router names prompt blocks as the workers' KV events do. `max_inflight` bounds the
        requests between arrival and end (validating, queued or running), `max_queued` those
        waiting for KV blocks (`pdserve.router.admission`). A worker that fails is asked
        whether it is back after `restart_backoff_s`, then at doubling intervals up to
        `restart_max_backoff_s`. A worker whose KV events (a heartbeat at least every second)
        stop for `stall_timeout_s` is stuck: it is restarted."""
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_inflight = max_inflight
        self.model_name = model_name
        self.prefill_workers = dict(prefill)
        self.decode_workers = dict(decode)
        self.registry = WorkerRegistry(
            prefill,
            decode,
            on_down=self._on_worker_down,
            on_up=self._on_worker_up,
            backoff_s=restart_backoff_s,
            max_backoff_s=restart_max_backoff_s,
        )
        self.block_size = block_size
        self.salt = salt
        self.index = RadixIndex()
        self._placer = Placer(
            policy,
            prefill,
            decode,
            index=self.index,
            block_size=block_size,
            cache_weight=cache_weight,
            local_prefill_max_tokens=local_prefill_max_tokens,
        )
        self._streams = DecodeStreams(decode, on_lost=self.registry.report_failure)
        workers = {**self.prefill_workers, **self.decode_workers}
        self._kv_feed = KVFeed(
            self.index,
            {w: ActorKVSource(h) for w, h in workers.items()},
            on_lost=self.registry.report_failure,
            on_stuck=self.registry.report_stuck,
            stall_timeout_s=stall_timeout_s,
        )
        self._finished = RequestTable(request_table_size, request_table_ttl_s)
        self.admission = Admission(max_queued)
        self._tokenize_pool = concurrent.futures.ThreadPoolExecutor(
            TOKENIZER_THREADS, thread_name_prefix="tokenize"
        )
        self._num_arrived = 0  # requests between arrival and end
        self._inflight: dict[tuple[str, str], _InFlight] = {}  # placed, by (owner, id)
        self._queued: dict[tuple[str, str], _Queued] = {}  # waiting for KV blocks
        self._background: set[asyncio.Task[Any]] = set()
        self._server: RunningServer | None = None
        self._http: HttpServer | None = None
        self.metrics = RouterMetrics(lambda: self._num_arrived, lambda: self.num_queued)

    @property
    def num_inflight(self) -> int:
        """Requests from arrival to end: validating, queued for KV blocks, or running."""
        return self._num_arrived

    @property
    def num_queued(self) -> int:
        return self.admission.num_queued

    @property
    def http_port(self) -> int | None:
        return None if self._http is None else self._http.port

    async def start(
        self,
        listen: str,
        *,
        tls: ServerTLS | None = None,
        api_keys: Collection[str] = (),
        http_listen: str | None = None,
        openai: bool = False,
    ) -> int:
        """Starts consuming the decode workers' streams and every worker's KV events, and
        serving on `listen` (host:port; port 0 picks a free one), over TLS when `tls` is
        given, requiring one of `api_keys` when there are any. With `http_listen`, the HTTP
        door serves `/metrics` there, and the OpenAI API too with `openai`, under the same TLS
        and keys. Returns the bound gRPC port."""
        await self._learn_kv_capacity(list(self.decode_workers))
        self._server = await start_server(self, listen, tls=tls, api_keys=api_keys)
        if http_listen is not None:
            self._http = await start_http(
                self, http_listen, openai=openai, tls=tls, api_keys=api_keys
            )
        for worker_id in self.decode_workers:
            self._streams.watch(worker_id, 0)
        self._kv_feed.start()
        return self._server.port

    async def stop(self, grace: float = 5.0) -> None:
        """Lets requests in flight finish for `grace` seconds, cancels the rest (aborting them
        on the workers), then stops consuming streams."""
        if self._http is not None:
            await self._http.stop()
            self._http = None
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self._background:
            # the aborts of the requests cancelled above; a dead worker must not hold us up
            await asyncio.wait(self._background, timeout=max(grace, 1.0))
        await self.registry.stop()
        await self._streams.stop()
        await self._kv_feed.stop()
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)

    async def generate(
        self,
        request: pb.GenerateRequest,
        send: Send,
        *,
        owner: str = "",
        deadline_s: float | None = None,
        arrival: float | None = None,
    ) -> None:
        """Runs one request, calling `send` for each response message; raises a
        `PdserveError` to end the RPC with its status code. Both doors (gRPC and HTTP) come
        here; the request's metrics are observed and its log lines carry its id. `owner`
        scopes the request id (`auth.key_owner`); `deadline_s` is the time the caller has left;
        `arrival` is when the door took the call (`time.monotonic()`; now when not given).
        The request counts in flight from its arrival to its end."""
        if arrival is None:
            arrival = time.monotonic()
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        token = REQUEST_ID.set(request.request_id)
        final: pb.GenerateResponse | None = None

        async def watch(response: pb.GenerateResponse) -> None:
            nonlocal final
            if response.finish_reason:
                final = response
            await send(response)

        try:
            self.refuse_if_overloaded()
            self._num_arrived += 1
            try:
                await self._generate(request, watch, owner, arrival, deadline_s)
            finally:
                self._num_arrived -= 1
        except BaseException as e:
            self.metrics.request_failed(e, time.monotonic() - arrival)
            raise
        else:
            assert final is not None
            self.metrics.request_done(final)
        finally:
            REQUEST_ID.reset(token)

    def refuse_if_overloaded(self) -> None:
        """Raises `CapacityExceeded` when a newcomer is refused whatever it asks: `max_inflight`
        requests are in flight, or the queue for KV blocks is full. `generate` checks first;
        a door may check before it even reads the request."""
        if self._num_arrived >= self.max_inflight:
            raise CapacityExceeded(
                f"{self._num_arrived} requests in flight; the router takes {self.max_inflight}"
            )
        self.admission.refuse_if_full()

    async def _generate(
        self,
        request: pb.GenerateRequest,
        send: Send,
        owner: str,
        arrival: float,
        deadline_s: float | None,
    ) -> None:
        valid = await self._validated(request, owner)
        request_id = request.request_id
        key = (owner, request_id)
        if key in self._inflight or key in self._queued:
            raise RequestFailed(
                "ALREADY_EXISTS", f"request_id: {request_id!r} is already in flight"
            )
        params = valid.params
        if params.seed is None:
            params = dataclasses.replace(params, seed=random.getrandbits(63))
        context = valid.context
        kv_blocks = blocks_for(len(context) + params.max_tokens, self.block_size)
        if not await self._admit(key, kv_blocks, request.priority, deadline_s):
            unplaced = Assignment("", "")
            builder = ResponseBuilder(
                request_id, self.tokenizer, context, params, arrival, unplaced
            )
            await send(builder.on_delta(TokenDelta(request_id, (), finish_reason="abort")))
            finished = FinishedRequest(valid.prompt_token_ids, valid.output_token_ids, params)
            self._finished.put(request_id, finished, owner)
            return
        try:
            demand = self._demand(request.placement, context, params.max_tokens)
            # NOTE: the engine counts resumed output towards max_tokens, as the uninterrupted
            # request would have.
            first = PrefillRequest(
                attempt_id="",
                prompt_token_ids=valid.prompt_token_ids,
                params=dataclasses.replace(
                    params, max_tokens=params.max_tokens + len(valid.output_token_ids)
                ),
                decode_worker="",
                output_token_ids=valid.output_token_ids,
            )
            flight = self._attempt(owner, request_id, first, self._placer.place(demand))
        except BaseException:
            self.admission.release(kv_blocks)
            raise
        builder = ResponseBuilder(
            request_id,
            self.tokenizer,
            context,
            params,
            arrival,
            flight.assignment,
            valid.skip_special_tokens,
        )
        self._inflight[key] = flight
        try:
            attempts, avoid = 1, set()
            while builder.finish_reason is None:
                event = await flight.queue.get()
                broken = failover.broken_worker(event, flight.assignment.decode)
                if broken is not None:
                    if attempts >= failover.MAX_ATTEMPTS:
                        raise RequestFailed(
                            "UNAVAILABLE", f"decode workers failed {attempts} times in a row"
                        )
                    attempts += 1
                    avoid.add(broken)
                    request_now = failover.continuation(first, builder.token_ids)
                    moved = await self._fail_over(flight, request_now, demand, avoid)
                    if moved is None:  # aborted while it waited for a decode worker
                        end = TokenDelta(flight.attempt_id, (), finish_reason="abort")
                        await send(builder.on_delta(end))
                        break
                    flight = moved
                    builder.moved_to(flight.assignment)
                    continue
                if isinstance(event, Failure):
                    raise RequestFailed(event.code, event.message)
                if event.finish_reason is not None and not flight.aborted:
                    flight.decode_finished = True
                if event.finish_reason == "error":
                    raise RequestFailed("INTERNAL", event.error or "the decode worker failed")
                await send(builder.on_delta(event))
        finally:
            del self._inflight[key]
            self._end_attempt(flight)
            self.admission.release(kv_blocks)
            output = valid.output_token_ids + tuple(builder.token_ids)
            finished = FinishedRequest(valid.prompt_token_ids, output, params)
            self._finished.put(request_id, finished, owner)

    def _attempt(
        self, owner: str, request_id: str, request: PrefillRequest, assignment: Assignment
    ) -> _InFlight:
        """Starts one attempt of a request on `assignment`: its queue is registered before the
        prefill call is made, because its first tokens may arrive before that call returns."""
        attempt_id = f"{request_id}/{uuid.uuid4().hex[:12]}"
        queue = self._streams.register(attempt_id, assignment.decode)
        flight = _InFlight(owner, request_id, attempt_id, assignment, queue)
        request = dataclasses.replace(
            request, attempt_id=attempt_id, decode_worker=assignment.decode
        )
        flight.prefill = asyncio.create_task(self._prefill(flight, request))
        return flight

    async def _fail_over(
        self, flight: _InFlight, request: PrefillRequest, demand: Demand, avoid: set[str]
    ) -> _InFlight | None:
        """Ends the broken attempt and starts the continuation `request` on another decode
        worker, waiting (up to `failover.WAIT_FOR_DECODE_S`) for one to be up; None if the
        request is aborted meanwhile. A decode worker that failed this request is tried again
        only when it is the only one up."""
        logger.warning(
            "request %s: moving off decode worker %s with %d tokens of output",
            flight.request_id,
            flight.assignment.decode,
            len(request.output_token_ids),
        )
        self.metrics.failovers.labels("decode").inc()
        self._end_attempt(flight)
        moved = dataclasses.replace(
            demand,
            num_tokens=len(request.prompt_token_ids) + len(request.output_token_ids),
            max_tokens=request.params.max_tokens - len(request.output_token_ids),
        )
        deadline = time.monotonic() + failover.WAIT_FOR_DECODE_S
        while True:
            if flight.abort_requested:
                return None
            up = set(self.registry.up("decode"))
            avoiding = frozenset(avoid) if up - avoid else frozenset()
            try:
                assignment = self._placer.place(dataclasses.replace(moved, avoid=avoiding))
                break
            except RequestFailed:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                await self.registry.wait_for_change(min(left, ABORT_CHECK_S))
        moved_flight = self._attempt(flight.owner, flight.request_id, request, assignment)
        self._inflight[flight.owner, flight.request_id] = moved_flight
        return moved_flight

    async def abort(self, request_id: str, *, owner: str = "") -> None:
        """Ends a request in flight with finish_reason "abort": at once if it waits for KV
        blocks, else once both workers freed it. Only its owner finds it: to any other caller
        it does not exist."""
        queued = self._queued.get((owner, request_id))
        if queued is not None:
            queued.aborted = True
            queued.admission.cancel()
            return
        flight = self._inflight.get((owner, request_id))
        if flight is None:
            raise NotFound(f"request_id: no request {request_id!r} is in flight")
        flight.abort_requested = True
        attempt = flight.attempt_id
        self._streams.push(attempt, TokenDelta(attempt, (), finish_reason="abort"))
        await self._abort_on_workers(flight)

    async def _validated(self, request: pb.GenerateRequest, owner: str) -> ValidRequest:
        resume_from = request.resume_from
        # NOTE: an over-long id is refused by `validate`, naming the field.
        known_length = len(resume_from) <= MAX_REQUEST_ID_LEN
        earlier = self._finished.get(resume_from, owner) if resume_from and known_length else None
        check = functools.partial(
            validate,
            request,
            self.tokenizer,
            vocab_size=self.vocab_size,
            max_model_len=self.max_model_len,
            earlier=earlier,
        )
        # NOTE: tokenizing a long text or chat takes milliseconds; off the loop, it does not
        # stall every other stream. Short prompts are cheaper inline than a thread hop.
        long_input = request.ByteSize() > LONG_INPUT_BYTES and request.WhichOneof("input") in (
            "text",
            "chat",
        )
        if long_input:
            # NOTE: oversized text is refused here, before it waits for a tokenizer thread, so
            # a flood of it holds no memory beyond the request being looked at.
            check_text_size(request, self.tokenizer, self.max_model_len)
            return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, check)
        return check()

    def _demand(self, pins: pb.Placement, context: tuple[int, ...], max_tokens: int) -> Demand:
        # NOTE: only cache_aware reads the index; the other policies need no hashes.
        hashes = block_hashes(context, self.block_size, self.salt) if self._placer.aware else ()
        return Demand(hashes, len(context), max_tokens, pins.prefill_worker, pins.decode_worker)

    async def _admit(
        self, key: tuple[str, str], kv_blocks: int, priority: int, deadline_s: float | None
    ) -> bool:
        """Waits until `kv_blocks` are charged to the request (`Admission.acquire`); False,
        with nothing charged, when the Abort RPC ended the wait."""
        task = asyncio.ensure_future(self.admission.acquire(kv_blocks, priority, deadline_s))
        queued = self._queued[key] = _Queued(task)
        try:
            await task
        except asyncio.CancelledError:
            if task.done() and not task.cancelled() and task.exception() is None:
                self.admission.release(kv_blocks)  # admitted as this call was cancelled
            current = asyncio.current_task()
            if queued.aborted and not (current is not None and current.cancelling()):
                return False
            raise
        finally:
            del self._queued[key]
        if queued.aborted:  # admitted as the abort came
            self.admission.release(kv_blocks)
            return False
        return True

    async def cluster_status(self) -> pb.ClusterStatus:
        return await cluster_status(self)

    async def _prefill(self, flight: _InFlight, request: PrefillRequest) -> None:
        """Makes the prefill call (to the decode worker itself when placement chose no prefill
        worker); a failure reaches the request's queue as a `Failure`, a retryable one when
        the path to the decode worker broke.

        If the prefill worker itself fails (it died, or its call raised), the decode worker
        prefills the request: it has the whole request, and seeded sampling makes the result
        the same."""
        worker, decode = flight.assignment.prefill, flight.assignment.decode
        try:
            if not worker:
                failure = await self._prefill_on_decode(request, decode)
            else:
                try:
                    result = await self.prefill_workers[worker].prefill.remote(request)
                except Exception as e:
                    logger.warning("prefill worker %s failed (%s); decode prefills", worker, e)
                    self.registry.call_failed(worker, e)
                    self.metrics.failovers.labels("prefill").inc()
                    failure = await self._prefill_on_decode(request, decode)
                else:
                    failure = None
                    if not result.ok:
                        code, error = result.error_code or "INTERNAL", result.error
                        # NOTE: UNAVAILABLE from a prefill worker: it could not reach the
                        # decode worker.
                        failure = Failure(
                            code, error or "prefill failed", retryable=code == "UNAVAILABLE"
                        )
        finally:
            self._placer.prefill_done(flight.assignment)
        if failure is not None:
            self._streams.push(flight.attempt_id, failure)

    async def _prefill_on_decode(self, request: PrefillRequest, decode: str) -> Failure | None:
        try:
            await self._streams.submit(decode, request)
        except ConnectionError as e:
            return Failure("UNAVAILABLE", f"decode worker {decode}: {e}", retryable=True)
        return None

    def _end_attempt(self, flight: _InFlight) -> None:
        """Drops an attempt's state, once; unless the decode worker finished it, aborts it on
        the workers in the background (this runs on cancellation too, so it must not wait).
        The request keeps its admission charge (it moves, or ends, with it)."""
        if flight.ended:
            return
        flight.ended = True
        self._streams.unregister(flight.attempt_id)
        self._placer.decode_done(flight.assignment)
        if not flight.decode_finished:
            self._spawn(self._abort_on_workers(flight))
        elif flight.prefill is not None:
            flight.prefill.cancel()

    async def _abort_on_workers(self, flight: _InFlight) -> None:
        if flight.aborted:
            return
        flight.aborted = True
        calls = [self.decode_workers[flight.assignment.decode].abort.remote(flight.attempt_id)]
        prefill = flight.assignment.prefill
        if flight.prefill is not None and not flight.prefill.done():
            flight.prefill.cancel()
            if prefill:
                calls.append(self.prefill_workers[prefill].abort.remote(flight.attempt_id))
        for outcome in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(outcome, Exception):
                logger.info("abort of %s failed: %s", flight.attempt_id, outcome)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _on_worker_down(self, worker: Worker) -> None:
        """Takes a failed worker out of placement, admission and the index; every request
        decoding there moves elsewhere."""
        self._placer.disable(worker.role, worker.worker_id)
        self.index.remove_worker(worker.worker_id)
        if worker.role == "decode":
            self.admission.remove(worker.worker_id)
            self._streams.lose(worker.worker_id)
        self._spawn(self._report_health())

    def _on_worker_up(self, worker: Worker) -> None:
        """Consumes a returning worker's streams anew (its KV events rebuild its part of the
        index from a snapshot) and places requests on it again."""
        if worker.role == "decode":
            self._streams.watch(worker.worker_id, worker.epoch)
            self._spawn(self._learn_kv_capacity([worker.worker_id]))
        self._kv_feed.watch(worker.worker_id, worker.epoch)
        self._placer.enable(worker.role, worker.worker_id)
        self._spawn(self._report_health())

    async def _report_health(self) -> None:
        if self._server is not None:
            await self._server.set_serving(self.registry.serving)

    async def _learn_kv_capacity(self, worker_ids: list[str]) -> None:
        """Asks decode workers for the size of their KV pools, which admission fills."""
        workers = [(w, self.decode_workers[w]) for w in worker_ids]
        answers = await asyncio.gather(
            *(asyncio.wait_for(h.status.remote(), STATUS_TIMEOUT_S) for _, h in workers),
            return_exceptions=True,
        )
        for (worker_id, _), status in zip(workers, answers):
            if isinstance(status, BaseException):
                logger.warning("decode worker %s: no KV pool size (%s)", worker_id, status)
            else:
                self.admission.set_capacity(worker_id, status.total_blocks)
