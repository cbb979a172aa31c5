from p2r_recipe.records import Journal


def test_journal_keeps_entries_and_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "j.jsonl"
    journal = Journal(path)
    journal.add("a", {"x": 1}, id="s1")
    journal.add("b", "text")
    with path.open("a") as file:
        file.write('{"key": "c", "val')  # a write cut by SIGKILL
    again = Journal(path)
    assert again.entries == {"a": {"x": 1}, "b": "text"} and "c" not in again
    again.add("c", 3)
    assert Journal(path).get("c") == 3
    assert len(path.read_text().splitlines()) == 3
