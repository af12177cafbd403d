"""The blob listener's signed URLs: their fields are read only as the mirror writes them."""

import time

from hubrewrite.cache.signing import BlobUrlSigner


def test_signed_urls_are_read_only_as_written():
    signer = BlobUrlSigner(b"k" * 64)
    digest = "sha256:" + "a" * 64
    expires = int(time.time()) + 60
    mac = signer._mac(digest, expires)
    assert signer.verify(digest, str(expires), mac)
    arabic = str(expires).translate(str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩"))
    for spelled, signature in [("0" + str(expires), mac), (arabic, mac), (f" {expires}", mac), (f"+{expires}", mac),
                               ("9" * 5000, mac), (str(expires), mac.upper()), (str(expires), "é" * 64),
                               (str(expires), mac[:-1])]:
        assert not signer.verify(digest, spelled, signature), (spelled[:20], signature[:8])
