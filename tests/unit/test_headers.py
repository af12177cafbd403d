from hubrewrite.registry.headers import end_to_end, upstream_request_headers, without_credentials


def test_hop_by_hop_and_connection_named_headers_dropped():
    fields = [
        ("Connection", "keep-alive, X-Secret-Hop"),
        ("X-Secret-Hop", "1"),
        ("Keep-Alive", "timeout=5"),
        ("Transfer-Encoding", "chunked"),
        ("Docker-Content-Digest", "sha256:x"),
    ]
    assert end_to_end(fields) == [("Docker-Content-Digest", "sha256:x")]


def test_repeated_accept_kept_in_order_host_dropped():
    fields = [
        ("Host", "mirror"),
        ("Accept", "application/vnd.oci.image.index.v1+json"),
        ("Accept", "application/vnd.docker.distribution.manifest.list.v2+json"),
        ("Authorization", "Bearer t"),
        ("Content-Length", "0"),
    ]
    assert upstream_request_headers(fields) == [
        ("Accept", "application/vnd.oci.image.index.v1+json"),
        ("Accept", "application/vnd.docker.distribution.manifest.list.v2+json"),
        ("Authorization", "Bearer t"),
    ]


def test_redirect_target_never_gets_credentials():
    fields = [("Authorization", "Bearer t"), ("Cookie", "a=b"), ("Range", "bytes=0-9"), ("Proxy-Authorization", "x")]
    assert without_credentials(upstream_request_headers(fields)) == [("Range", "bytes=0-9")]
