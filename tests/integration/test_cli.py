"""The CLI as users run it: evaluate, replay + consume + recommend, against real services."""

from __future__ import annotations

import json
import re

from tests.integration.helpers import consume_until, run_fusionrec
from tests.paths import SHARED_DATA, needs_shared_data


def test_evaluate_reports_every_method_as_json_and_plots(settings, tmp_path, tiny_bert):
    plot = tmp_path / "hit.png"
    settings = settings.replace(embed_model_path=str(tiny_bert()))
    out = run_fusionrec(settings, "evaluate", "--dataset", "completejourney", "--households", "60", "--limit",
                        "8000", "--json", "--plot", str(plot))
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["dataset"] == "completejourney" and report["events"] == 8000
    assert report["evaluated"] > 300
    assert set(report["methods"]) == set(report["cold_start"]) == {
        "system", "river", "torch_head", "fusion_no_llm", "covisitation", "content", "fresh", "served",
        "popularity", "most_bought", "tifu_knn", "tifu_knn_dunnhumby", "upcf", "repurchase"}
    assert report["learner"]["examples"] > 0 and report["learner"]["decisions"]["labelled"] > 0
    served = report["learner"]["served_order"]
    assert len(served) == 5 and sum(seg["decisions"] for seg in served.values()) > 0
    assert {seg["order"] for seg in served.values()} <= {"fusion", "river", "torch_head", "fusion_plain",
                                                            "reciprocal_rank"}
    assert 0 < report["cold_start_evaluated"] < report["evaluated"]
    figures = {"hit_rate@10", "recall@20", "ndcg@10", "ndcg@10_basket"}
    for m in report["methods"].values():
        assert set(m) == figures | {"repeat", "explore"}
        for split in (m["repeat"], m["explore"]):
            assert set(split) == figures | {"baskets", "items", "found@20"}
            assert split["baskets"] > 0
        assert m["ndcg@10_basket"] <= m["ndcg@10"]
    for m in report["cold_start"].values():
        assert set(m) == figures
    for m in [*report["methods"].values(), *report["cold_start"].values()]:
        assert all(0.0 <= v <= 1.0 for k, v in m.items() if k in figures)
    # the system against every other method basket by basket (the published ones from their worker process):
    # wins less losses over the baskets is the difference of the two hit rates (each rounded to 4 places)
    for split, by, count in (("overall", report["methods"], report["evaluated"]),
                             ("cold_start", report["cold_start"], report["cold_start_evaluated"])):
        assert set(report["paired"][split]) == set(by) - {"system"}
        for name, p in report["paired"][split].items():
            diff = by["system"]["hit_rate@10"] - by[name]["hit_rate@10"]
            assert abs((p["wins"] - p["losses"]) / count - diff) <= 1.0001e-4
            assert 0.0 <= p["p"] <= 1.0
    assert report["methods"]["content"]["recall@20"] > 0  # profile vectors were built and searched
    assert report["methods"]["system"]["hit_rate@10"] > report["methods"]["popularity"]["hit_rate@10"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_shared_data
def test_evaluate_a_clickstream_file(settings):
    out = run_fusionrec(settings.replace(progress_log_s=0.5), "evaluate", "--events",
                        str(SHARED_DATA / "rees46-2019-oct-first-17k.csv"), "--preset", "rees46", "--json",
                        "--no-content")
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["events"] == 17434 and report["evaluated"] > 50
    # no bar (stderr is a pipe, --json): log lines say how far the run is
    assert re.search(r"evaluate: \d+ of 17434 events \(\d+ %\), \d+ events/s, about [\d.]+ min left", out.stderr)
    assert not {"content", "fresh", "torch_head", "fusion_no_llm"} & set(report["methods"])  # no vectors


def test_replay_then_recommend_explains_sources(settings):
    out = run_fusionrec(settings, "replay", "completejourney", "--households", "10", "--limit", "2000")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "published" in out.stdout
    n_catalog = int(out.stdout.split("published ")[1].split(" ")[0])
    consume_until(settings, 2000 + n_catalog)
    import pandas as pd

    from fusionrec.streams import datasets

    user = datasets.completejourney(households=10).head(2000).events.user_id.iloc[0]
    rec = run_fusionrec(settings, "recommend", str(user), "--k", "5")
    assert rec.returncode == 0, rec.stderr
    lines = rec.stdout.strip().splitlines()
    assert lines[0].startswith(f"user {user}: 5 items from fusion")
    assert all("[" in line and "]" in line for line in lines[1:])
    as_json = json.loads(run_fusionrec(settings, "recommend", str(user), "--json").stdout)
    assert as_json["user_id"] == str(user) and len(as_json["items"]) == 10
    assert pd.notna(as_json["generated_at"])
    unknown = run_fusionrec(settings, "recommend", "no-such-user")
    assert "fallback" in unknown.stdout
