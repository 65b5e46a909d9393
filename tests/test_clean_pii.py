"""PII redaction and the harmful-content filters (URL blocklist, bad words, --filter-fn)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megalm.data.clean import CleanConfig, clean_corpus
from megalm.data.errors import DataError
from megalm.data.filters import FilterConfig, blocked_url
from megalm.data.pii import EMAIL_PLACEHOLDERS, IP_PLACEHOLDERS, PIIConfig, PIIRedactor, valid_cn_id

ROOT = Path(__file__).resolve().parents[1]
FILLER = ("The river ran past the old mill and the children of the village swam in its pools during the long "
          "summer days, while the farmers gathered apples for cider in the autumn and sold them at the fair. ")
ZH_FILLER = "春天来了，城市边上的小河慢慢解冻，河水在阳光下闪着细碎的光。早上六点多，公园里已经有不少人在散步，有的老人打太极拳。"


def redact(text, **config):
    return PIIRedactor(PIIConfig(**config)).redact(text)


def test_english_pii_is_redacted_and_counted():
    text = ("Write to jane.doe+news@mail.example-corp.co.uk or J_Smith@uni.edu, visit 8.8.8.8 or "
            "2001:4860:4860::8888, call +1 (415) 555-2671, 415-555-2671, (415) 555-2671 or +44 20 7946 0958.")
    out, counts = redact(text)
    assert counts == {"email": 2, "ip": 2, "phone": 4}
    for secret in ("jane.doe", "J_Smith", "8.8.8.8", "4860", "2671", "7946"):
        assert secret not in out
    assert sum(out.count(p) for p in EMAIL_PLACEHOLDERS) == 2
    assert sum(out.count(p) for p in IP_PLACEHOLDERS) == 2
    assert out.count("555-0100") == 4


def test_chinese_pii_is_redacted_without_word_boundaries():
    text = "我的手机号是13812345678，也可以打+86 139 0013 8000。身份证号11010519491231002X，邮箱zhang.san@example.cn。"
    out, counts = redact(text)
    assert counts == {"email": 1, "cn_id": 1, "cn_mobile": 2}
    email = [p for p in EMAIL_PLACEHOLDERS if p in out]
    assert email and out == f"我的手机号是13000000000，也可以打13000000000。身份证号000000000000000000，邮箱{email[0]}。"


@pytest.mark.parametrize("text", [
    "In 2023 the price rose from $1,299.00 to 1,499.99 euros (about 12.5%).",
    "Released on 2023-01-15 as version 3.11.2, then v1.2.3.4 and build 1.2.3.4.5.",
    "ISBN 978-3-16-148410-0; 1.000.000 and 10 000 000 people; order 123456789.",
    "Private hosts 192.168.1.1, 10.0.0.7 and 127.0.0.1, the time 12:30:45, loopback ::1.",
    "订单号123456789012345678，共计3,000元，2024年5月1日发货。",
    "身份证号11010519491231002Y的校验位不对，11010519491231003X也不对。",
    "电话号码12812345678不是手机号，238-12345-67890也不是。",
])
def test_ordinary_numbers_survive(text):
    assert redact(text) == (text, {})


def test_resident_id_checksum():
    assert valid_cn_id("11010519491231002X")
    assert valid_cn_id("440524188001010014")
    assert not valid_cn_id("440524188001010015")


def test_each_kind_switches_off():
    text = "a@b.com 8.8.8.8 +1 (415) 555-2671 13812345678 11010519491231002X"
    assert redact(text, redact_email=False)[1] == {"ip": 1, "phone": 1, "cn_mobile": 1, "cn_id": 1}
    off = dict(redact_email=False, redact_ip=False, redact_phone=False, redact_cn_id=False, redact_cn_mobile=False)
    assert redact(text, **off) == (text, {})


def test_placeholders_depend_only_on_the_match():
    first, _ = redact("1.1.1.1 and 9.9.9.9 then 1.1.1.1")
    ips = first.split(" ")
    assert ips[0] == ips[4] and set(ips[::2]) <= set(IP_PLACEHOLDERS)


def write(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


@pytest.fixture
def lists(tmp_path):
    (tmp_path / "blocked.txt").write_text("# shock sites\nbad-site.example\nwww.spam.test\n")
    (tmp_path / "en.txt").write_text("darn\nheck no\n")
    (tmp_path / "zh.txt").write_text("坏词\n")
    return tmp_path


def test_blocked_domains_and_subdomains():
    blocklist = frozenset(["bad-site.example", "spam.test"])
    assert blocked_url("https://bad-site.example/page", blocklist)
    assert blocked_url("http://news.bad-site.example:8080/x?y", blocklist)
    assert blocked_url("spam.test/path", blocklist)
    assert not blocked_url("https://notbad-site.example/", blocklist)
    assert not blocked_url("https://example.org/bad-site.example", blocklist)


def test_filters_reject_with_reasons_and_pii_is_counted(tmp_path, lists):
    records = [
        {"id": 0, "url": "https://good.example/a", "text": FILLER * 2 + "Mail me at someone@mail.com please."},
        {"id": 1, "url": "https://www.bad-site.example/b", "text": FILLER * 2},
        {"id": 2, "url": "https://sub.spam.test/c", "text": FILLER * 2 + " unique words here"},
        {"id": 3, "text": FILLER * 2 + " Oh heck no, said the miller."},
        {"id": 4, "text": FILLER * 2 + " The Darndest thing happened."},  # not a whole-word match
        {"id": 5, "text": ZH_FILLER * 3 + "这里有一个坏词。"},  # matched inside Chinese text
        {"id": 6, "text": ZH_FILLER * 3 + "联系电话13812345678。"},
    ]
    write(tmp_path / "in.jsonl", records)
    filters = FilterConfig(url_blocklist=str(lists / "blocked.txt"), bad_words=[f"en={lists}/en.txt",
                                                                                f"zh={lists}/zh.txt"])
    counts = clean_corpus([str(tmp_path / "in.jsonl")], str(tmp_path / "out.jsonl"), CleanConfig(quality=False, near_dedup=False),
                          rejected=str(tmp_path / "rejected.jsonl"), filters=filters)
    kept = [json.loads(line) for line in open(tmp_path / "out.jsonl", encoding="utf-8")]
    rejected = {r["id"]: r["rejected_by"] for r in map(json.loads, open(tmp_path / "rejected.jsonl"))}
    assert rejected == {1: "url_blocklist", 2: "url_blocklist", 3: "bad_words", 5: "bad_words"}
    assert [r["id"] for r in kept] == [0, 4, 6]
    assert "someone@mail.com" not in kept[0]["text"] and "13812345678" not in kept[2]["text"]
    assert counts["removed"]["url_blocklist"] == 2 and counts["removed"]["bad_words"] == 2
    assert counts["pii"] == {"email": 1, "ip": 0, "phone": 0, "cn_id": 0, "cn_mobile": 1}


def test_filter_fn_hook(tmp_path, monkeypatch):
    (tmp_path / "my_scores.py").write_text("def score(record):\n    return 0.0 if 'mill' in record['text'] else 1.0\n"
                                           "def broken(record):\n    raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    write(tmp_path / "in.jsonl", [{"text": FILLER * 2}, {"text": FILLER.replace("mill", "barn") * 2}])
    out = str(tmp_path / "out.jsonl")
    counts = clean_corpus([str(tmp_path / "in.jsonl")], out, CleanConfig(quality=False, near_dedup=False),
                          filters=FilterConfig(filter_fn="my_scores:score"))
    assert counts["kept"] == 1 and counts["removed"]["filter_fn"] == 1
    with pytest.raises(DataError, match=r"--filter-fn my_scores:broken failed on .*in.jsonl:1: RuntimeError: boom"):
        clean_corpus([str(tmp_path / "in.jsonl")], str(tmp_path / "out2.jsonl"), CleanConfig(quality=False),
                     filters=FilterConfig(filter_fn="my_scores:broken"))
    assert not (tmp_path / "out2.jsonl").exists()


@pytest.mark.parametrize("flags, message", [
    (["--url-blocklist", "missing.txt"], "--url-blocklist missing.txt: no such file"),
    (["--bad-words", "en.txt"], "--bad-words en.txt: give LANG=FILE"),
    (["--filter-fn", "no_such_module_xyz:score"], "--filter-fn no_such_module_xyz:score: cannot import"),
    (["--filter-fn", "json"], "--filter-fn json: give module:function"),
    (["--filter-fn", "json:nothing"], "--filter-fn json:nothing: json has no function nothing"),
])
def test_tool_filter_errors_are_one_line(tmp_path, flags, message):
    write(tmp_path / "in.jsonl", [{"text": FILLER}])
    result = subprocess.run([sys.executable, str(ROOT / "tools/clean_corpus.py"), "--input", str(tmp_path / "in.jsonl"),
                             "--output", str(tmp_path / "out.jsonl"), "--no-progress", *flags],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out.jsonl").exists()


def test_tool_reports_redactions(tmp_path):
    write(tmp_path / "in.jsonl", [{"text": FILLER * 2 + " Write to a.b@c.org or 8.8.4.4."}])
    result = subprocess.run([sys.executable, str(ROOT / "tools/clean_corpus.py"), "--input", str(tmp_path / "in.jsonl"),
                             "--output", str(tmp_path / "out.jsonl"), "--no-progress", "--no-redact-ip", "--no-quality"],
                            capture_output=True, text=True, check=True)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["pii"] == {"email": 1, "phone": 0, "cn_id": 0, "cn_mobile": 0}
    assert "redacted: email" in result.stdout
    assert "8.8.4.4" in (tmp_path / "out.jsonl").read_text()
