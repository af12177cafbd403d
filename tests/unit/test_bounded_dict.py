from hubrewrite.util.bounded_dict import BoundedDict


def test_the_oldest_written_entries_go_first():
    seen = BoundedDict(3)
    for key in "abcd":
        seen.put(key, key.upper())
    assert list(seen) == ["b", "c", "d"]
    seen.put("b", "again")  # written again: now the newest
    seen.put("e", "E")
    assert list(seen.items()) == [("d", "D"), ("b", "again"), ("e", "E")]
    assert seen.get("c") is None
