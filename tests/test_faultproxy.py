"""The fault proxy against the real moto S3 server: bytes pass through exactly, each fault
reaches boto3 as real S3 failures do, and the counters match what was transferred.

Also pins the botocore behaviours framekv's own retries are designed around: which faults
botocore retries by itself (an error status, a reset, a read timeout, a lost response) and
which it cannot (a GET body cut short: it is read after the call returned).
"""

import contextlib
import http.client
import os
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, ConnectionClosedError, ReadTimeoutError, ResponseStreamingError

from pipeline.store import s3_client
from tests.faultproxy import FaultProxy

MiB = 1 << 20
# `{"max_attempts": N}` means N *retries* to botocore (N + 1 attempts): say "total" to disable them.
NO_RETRIES = {"total_max_attempts": 1}
PIPELINE_RETRIES = {"mode": "adaptive", "max_attempts": 10}  # as pipeline.store.s3_client


def client(proxy: FaultProxy, **config):
    return boto3.client("s3", endpoint_url=proxy.endpoint, config=Config(**config))


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def raw_connection(proxy: FaultProxy) -> contextlib.closing[http.client.HTTPConnection]:
    return contextlib.closing(http.client.HTTPConnection("127.0.0.1", int(proxy.endpoint.rsplit(":", 1)[1]), timeout=10))


def statuses(proxy: FaultProxy, method: str | None = None) -> list[int | None]:
    return [r.status for r in proxy.requests(method)]


def test_objects_pass_through_byte_exact(s3_proxy, s3_bucket, s3_endpoint):
    s3 = client(s3_proxy, retries=NO_RETRIES)
    small, big = payload(10_000, 1), payload(20 * MiB, 2)
    parts = [payload(5 * MiB, 3), payload(5 * MiB, 4), payload(MiB + 3, 5)]
    s3.put_object(Bucket=s3_bucket, Key="small", Body=small)
    s3.put_object(Bucket=s3_bucket, Key="big", Body=big)
    upload_id = s3.create_multipart_upload(Bucket=s3_bucket, Key="multi")["UploadId"]
    etags = [
        s3.upload_part(Bucket=s3_bucket, Key="multi", UploadId=upload_id, PartNumber=n, Body=part)["ETag"]
        for n, part in enumerate(parts, start=1)
    ]
    s3.complete_multipart_upload(
        Bucket=s3_bucket, Key="multi", UploadId=upload_id,
        MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in enumerate(etags, start=1)]},
    )

    assert s3.get_object(Bucket=s3_bucket, Key="small")["Body"].read() == small
    assert s3.get_object(Bucket=s3_bucket, Key="big")["Body"].read() == big
    assert s3.get_object(Bucket=s3_bucket, Key="multi")["Body"].read() == b"".join(parts)
    assert s3.get_object(Bucket=s3_bucket, Key="big", Range="bytes=100-355")["Body"].read() == big[100:356]
    assert s3.head_object(Bucket=s3_bucket, Key="big")["ContentLength"] == len(big)
    listed = s3.list_objects_v2(Bucket=s3_bucket)["Contents"]
    assert {o["Key"]: o["Size"] for o in listed} == {"small": 10_000, "big": 20 * MiB, "multi": 11 * MiB + 3}
    direct = boto3.client("s3", endpoint_url=s3_endpoint)  # what the server stored, not what the proxy echoes
    assert direct.get_object(Bucket=s3_bucket, Key="big")["Body"].read() == big

    assert all(r.fault is None and r.status in (200, 206) for r in s3_proxy.log)
    assert [r.bytes_in for r in s3_proxy.requests("PUT", r"/big$")] == [len(big)]
    assert [r.bytes_in for r in s3_proxy.requests("PUT", r"/multi$")] == [len(p) for p in parts]
    assert s3_proxy.count("POST", r"/multi$") == 2  # create + complete
    gets = s3_proxy.requests("GET", r"/big$")
    assert [r.bytes_out for r in gets] == [len(big), 256]
    assert s3_proxy.bytes_out("GET", r"/big$") == len(big) + 256
    assert s3_proxy.bytes_out("GET", r"/(small|multi)$") == len(small) + 11 * MiB + 3
    assert s3_proxy.requests("HEAD")[0].bytes_out == 0
    assert s3_proxy.count() == 1 + 1 + 1 + 3 + 1 + 4 + 1 + 1  # puts, create, parts, complete, gets, head, list


def test_chunked_request_body_streams_through(s3_proxy, s3_bucket, s3_endpoint):
    pieces = [b"first ", payload(MiB + 7, 6), b"", b" last"]
    with raw_connection(s3_proxy) as conn:
        conn.request("PUT", f"/{s3_bucket}/chunked", body=iter(pieces), encode_chunked=True)
        response = conn.getresponse()
        response.read()
    assert response.status == 200
    stored = boto3.client("s3", endpoint_url=s3_endpoint).get_object(Bucket=s3_bucket, Key="chunked")
    assert stored["Body"].read() == b"".join(pieces)
    assert s3_proxy.requests("PUT")[0].bytes_in == sum(map(len, pieces))


def test_body_without_length_is_rechunked_and_dead_upstream_is_502():
    body = payload(300_000, 7)

    class Chunked(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for start in range(0, len(body), 100_000):
                piece = body[start:start + 100_000]
                self.wfile.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")

        def log_message(self, *args):
            pass

    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Chunked)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    try:
        with FaultProxy(f"http://127.0.0.1:{upstream.server_address[1]}") as proxy, raw_connection(proxy) as conn:
            sockets = []
            for _ in range(2):
                conn.request("GET", "/any")
                response = conn.getresponse()
                assert response.getheader("Transfer-Encoding") == "chunked" and response.read() == body
                sockets.append(conn.sock)
            assert sockets[0] is sockets[1] is not None  # one kept-alive connection
            assert proxy.bytes_out() == 2 * len(body)
    finally:
        upstream.shutdown()
        upstream.server_close()
    with FaultProxy(f"http://127.0.0.1:{upstream.server_address[1]}") as proxy, raw_connection(proxy) as conn:
        conn.request("GET", "/any")
        response = conn.getresponse()
        assert response.status == 502 and b"upstream" in response.read()


@pytest.mark.parametrize("fault,code", [("503", "SlowDown"), ("500", "InternalError")])
def test_error_status_reaches_client_before_upload(s3_proxy, s3_bucket, s3_endpoint, fault, code):
    s3 = client(s3_proxy, retries=NO_RETRIES)
    s3.put_object(Bucket=s3_bucket, Key="k", Body=b"v1")
    s3_proxy.inject(fault, method="GET")
    with pytest.raises(ClientError) as err:
        s3.get_object(Bucket=s3_bucket, Key="k")
    assert err.value.response["Error"]["Code"] == code
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == int(fault)
    s3_proxy.inject(fault, method="PUT")
    with pytest.raises(ClientError, match=code):
        s3.put_object(Bucket=s3_bucket, Key="k", Body=payload(MiB))
    # botocore sends `Expect: 100-continue`: the error went out before the body, as on S3
    assert s3_proxy.requests("PUT")[-1].bytes_in == 0
    direct = boto3.client("s3", endpoint_url=s3_endpoint)
    assert direct.get_object(Bucket=s3_bucket, Key="k")["Body"].read() == b"v1"
    assert s3.get_object(Bucket=s3_bucket, Key="k")["Body"].read() == b"v1"  # faults are spent
    assert statuses(s3_proxy) == [200, int(fault), int(fault), 200]


def test_reset_is_a_connection_error(s3_proxy, s3_bucket):
    s3 = client(s3_proxy, retries=NO_RETRIES)
    s3.put_object(Bucket=s3_bucket, Key="k", Body=b"v")
    s3_proxy.inject("reset", method="GET")
    with pytest.raises(ConnectionClosedError):
        s3.get_object(Bucket=s3_bucket, Key="k")
    s3_proxy.inject("reset", method="PUT")
    with pytest.raises(ConnectionClosedError):
        s3.put_object(Bucket=s3_bucket, Key="k2", Body=payload(MiB))
    assert [(r.fault, r.status, r.upstream_status) for r in s3_proxy.log[1:]] == [("reset", None, None)] * 2
    assert "k2" not in [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"]]


def test_timeout_is_a_read_timeout_and_stop_ends_the_hold(s3_endpoint, s3_bucket):
    read_timeout, hold = 0.5, 30.0
    with FaultProxy(s3_endpoint, timeout_hold=hold) as proxy:
        s3 = client(proxy, retries=NO_RETRIES, read_timeout=read_timeout)
        s3.put_object(Bucket=s3_bucket, Key="k", Body=b"v")
        proxy.inject("timeout", method="GET")
        started = time.monotonic()
        with pytest.raises(ReadTimeoutError):
            s3.get_object(Bucket=s3_bucket, Key="k")
        elapsed = time.monotonic() - started
        assert read_timeout <= elapsed < hold / 2
        assert proxy.log[-1].fault == "timeout" and proxy.log[-1].status is None
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 5  # stop() released the held request


def test_lost_response_means_done_but_not_told(s3_proxy, s3_bucket, s3_endpoint):
    s3 = client(s3_proxy, retries=NO_RETRIES)
    data = payload(2 * MiB, 8)
    s3_proxy.inject("lost_response", method="PUT")
    with pytest.raises(ConnectionClosedError):
        s3.put_object(Bucket=s3_bucket, Key="k", Body=data)
    put = s3_proxy.requests("PUT")[0]
    assert (put.fault, put.status, put.upstream_status, put.bytes_in) == ("lost_response", None, 200, len(data))
    direct = boto3.client("s3", endpoint_url=s3_endpoint)
    assert direct.get_object(Bucket=s3_bucket, Key="k")["Body"].read() == data


def test_truncate_is_an_incomplete_read(s3_proxy, s3_bucket):
    s3 = client(s3_proxy, retries=NO_RETRIES)
    data = payload(3 * MiB + 1, 9)
    s3.put_object(Bucket=s3_bucket, Key="k", Body=data)
    s3_proxy.inject("truncate", method="GET")
    body = s3.get_object(Bucket=s3_bucket, Key="k")["Body"]  # status and headers arrive whole
    with pytest.raises(ResponseStreamingError, match="IncompleteRead"):
        body.read()
    assert s3_proxy.bytes_out("GET") == len(data) // 2
    assert s3.get_object(Bucket=s3_bucket, Key="k")["Body"].read() == data


def test_pipeline_client_retries_through_two_503s(s3_proxy, s3_bucket):
    s3 = s3_client(s3_proxy.endpoint)
    data = payload(100_000, 10)
    s3.put_object(Bucket=s3_bucket, Key="k", Body=data)
    rule = s3_proxy.inject("503", method="GET", times=2)
    assert s3.get_object(Bucket=s3_bucket, Key="k")["Body"].read() == data
    assert rule.fired == 2
    assert statuses(s3_proxy, "GET") == [503, 503, 200]


@pytest.mark.parametrize("fault,method", [
    ("reset", "GET"), ("timeout", "GET"), ("lost_response", "GET"), ("lost_response", "PUT"), ("500", "PUT"),
])
def test_botocore_retries_failures_before_the_body(s3_proxy, s3_bucket, s3_endpoint, fault, method):
    """What botocore's adaptive mode retries by itself (framekv need not)."""
    s3_proxy.timeout_hold = 5.0
    s3 = client(s3_proxy, retries=PIPELINE_RETRIES, read_timeout=0.5)
    data = payload(MiB, 11)
    if method == "GET":
        s3.put_object(Bucket=s3_bucket, Key="k", Body=data)
    s3_proxy.inject(fault, method=method)
    if method == "GET":
        assert s3.get_object(Bucket=s3_bucket, Key="k")["Body"].read() == data
    else:
        s3.put_object(Bucket=s3_bucket, Key="k", Body=data)
    assert [r.fault for r in s3_proxy.requests(method)][-2:] == [fault, None]
    assert boto3.client("s3", endpoint_url=s3_endpoint).get_object(Bucket=s3_bucket, Key="k")["Body"].read() == data


def test_botocore_cannot_retry_a_truncated_get_body(s3_proxy, s3_bucket):
    """The GET body is read after get_object returned: botocore's retries are over by then."""
    s3 = client(s3_proxy, retries=PIPELINE_RETRIES)
    s3.put_object(Bucket=s3_bucket, Key="k", Body=payload(MiB, 12))
    s3_proxy.inject("truncate", method="GET", path="/k$")
    with pytest.raises(ResponseStreamingError):
        s3.get_object(Bucket=s3_bucket, Key="k")["Body"].read()
    assert s3_proxy.count("GET") == 1
    s3_proxy.inject("truncate", method="GET", path=f"/{s3_bucket}$")  # a list: its body is parsed inside the call
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"]] == ["k"]
    assert [r.fault for r in s3_proxy.requests("GET", f"/{s3_bucket}$")] == ["truncate", None]


def test_delay_is_added_to_every_request(s3_proxy, s3_bucket):
    s3 = client(s3_proxy, retries=NO_RETRIES)
    s3.put_object(Bucket=s3_bucket, Key="k", Body=b"v")
    s3_proxy.delay = 0.05
    started = time.monotonic()
    for _ in range(5):
        s3.head_object(Bucket=s3_bucket, Key="k")
    assert time.monotonic() - started >= 5 * 0.05


def test_rules_match_in_order_with_after_and_times(s3_proxy, s3_bucket):
    s3 = client(s3_proxy, retries=NO_RETRIES)
    for key in ("a", "b"):
        s3.put_object(Bucket=s3_bucket, Key=key, Body=key.encode())
    s3_proxy.reset()
    later = s3_proxy.inject("500", method="get", path=r"/b$", times=2, after=1)
    first_get = s3_proxy.inject("503", method="GET")
    outcomes = []
    for key in ("a", "b", "b", "b", "b"):
        try:
            outcomes.append(s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read())
        except ClientError as e:
            outcomes.append(e.response["Error"]["Code"])
    s3.head_object(Bucket=s3_bucket, Key="b")
    assert outcomes == ["SlowDown", b"b", "InternalError", "InternalError", b"b"]
    assert statuses(s3_proxy) == [503, 200, 500, 500, 200, 200]
    assert (later.seen, later.fired, first_get.fired) == (3, 2, 1)


def test_rules_fire_exactly_times_under_concurrency(s3_proxy, s3_bucket):
    s3 = client(s3_proxy, retries=NO_RETRIES, max_pool_connections=8)
    s3.put_object(Bucket=s3_bucket, Key="k", Body=b"v")
    s3_proxy.inject("503", method="GET", times=3)
    errors = []

    def worker():
        for _ in range(4):
            try:
                s3.get_object(Bucket=s3_bucket, Key="k")["Body"].read()
            except ClientError as e:
                errors.append(e.response["Error"]["Code"])

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == ["SlowDown"] * 3
    assert s3_proxy.count("GET") == 32 and statuses(s3_proxy, "GET").count(503) == 3


def test_reset_and_bad_rules(s3_proxy, s3_bucket):
    s3 = client(s3_proxy, retries=NO_RETRIES)
    s3_proxy.inject("503", method="HEAD")
    s3_proxy.reset()
    s3.put_object(Bucket=s3_bucket, Key="k", Body=b"v")
    s3.head_object(Bucket=s3_bucket, Key="k")  # the rule is gone
    assert statuses(s3_proxy) == [200, 200]
    s3_proxy.reset()
    assert s3_proxy.log == [] and s3_proxy.count() == 0
    with pytest.raises(ValueError, match="'bogus'"):
        s3_proxy.inject("bogus")
    with pytest.raises(ValueError, match="times"):
        s3_proxy.inject("503", times=0)
    with pytest.raises(ValueError, match="upstream"):
        FaultProxy("https://example.com")


def test_fixture_leaves_the_environment_alone(s3_proxy, s3_endpoint, s3_bucket):
    assert os.environ["AWS_ENDPOINT_URL"] == s3_endpoint != s3_proxy.endpoint
    boto3.client("s3").list_objects_v2(Bucket=s3_bucket)  # goes straight to moto
    assert s3_proxy.count() == 0
