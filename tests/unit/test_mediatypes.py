from hubrewrite.registry.mediatypes import MAX_KEY_LENGTH, accept_key, asks_for, same_answer

LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
INDEX = "application/vnd.oci.image.index.v1+json"
SCHEMA2 = "application/vnd.docker.distribution.manifest.v2+json"
OCI = "application/vnd.oci.image.manifest.v1+json"
SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+prettyjws"

DOCKER = accept_key([LIST, INDEX, SCHEMA2, OCI])


def test_the_key_is_the_manifest_types_as_sent():
    # order, spacing and repeated headers vs one list: the same key
    assert accept_key([f" {OCI} , {SCHEMA2}", f"{INDEX}", LIST]) == DOCKER
    # other types decide nothing
    assert accept_key([LIST, INDEX, SCHEMA2, OCI, "application/json", "text/html;q=0.1"]) == DOCKER
    # letter case and parameters are kept: the upstream may read them
    assert accept_key([LIST.upper(), INDEX.upper(), SCHEMA2, OCI]) != DOCKER
    assert LIST.upper() in accept_key([LIST.upper()])
    assert accept_key([f"{LIST};q=0", INDEX, SCHEMA2, OCI]) != DOCKER
    assert accept_key([f"{LIST} ; q = 0.5"]) == accept_key([f"{LIST};q=0.5"])
    # wildcards may decide (containerd sends */*)
    assert accept_key([LIST, INDEX, SCHEMA2, OCI, "*/*"]) != DOCKER
    assert accept_key([f"{LIST};x=" + "a" * MAX_KEY_LENGTH]) is None


def test_asked_for_means_named_exactly_and_not_refused():
    assert asks_for(DOCKER, LIST) and asks_for(DOCKER, SCHEMA2)
    assert not asks_for(DOCKER, SCHEMA1)
    assert not asks_for(accept_key([LIST.upper()]), LIST)
    assert not asks_for(accept_key([f"{LIST};q=0"]), LIST)
    assert not asks_for(accept_key([f"{LIST};q=0.000"]), LIST)
    assert asks_for(accept_key([f"{LIST};q=0.001"]), LIST)
    assert not asks_for(accept_key([f"{LIST};q=2"]), LIST)
    assert not asks_for(accept_key([f"{LIST};q"]), LIST)  # malformed: not known how it is read
    assert not asks_for(accept_key(["*/*"]), LIST)
    assert not asks_for(LIST + "," + SCHEMA2, LIST)  # a key of the earlier format


def test_stale_answers_only_for_an_accept_that_asked_for_their_type():
    single = accept_key([SCHEMA2, OCI])
    shouted = accept_key([LIST.upper(), INDEX.upper(), SCHEMA2, OCI])
    refusing = accept_key([f"{LIST};q=0", f"{INDEX};q=0", SCHEMA2])
    # the same key: the same answer
    assert same_answer(single, SCHEMA2, single) and same_answer(shouted, SCHEMA2, shouted)
    # an index answer: every client asking for that type gets it
    assert same_answer(DOCKER, LIST, accept_key([LIST, SCHEMA2]))
    assert not same_answer(DOCKER, LIST, refusing) and not same_answer(DOCKER, LIST, shouted)
    # a single image to a client that asked for both index types: the tag is that image
    assert same_answer(DOCKER, SCHEMA2, single)
    # ...not to one whose index types the upstream may not have read (case, q=0, only one of them)
    assert not same_answer(shouted, SCHEMA2, DOCKER)
    assert not same_answer(refusing, SCHEMA2, DOCKER)
    assert not same_answer(accept_key([INDEX, SCHEMA2]), SCHEMA2, DOCKER)
    assert not same_answer(single, SCHEMA2, DOCKER)
    # never a type the Accept did not ask for
    assert not same_answer(single, SCHEMA2, accept_key([OCI]))
    # entries of the earlier key format are never served
    assert not same_answer(LIST + "," + SCHEMA2, LIST, DOCKER)
