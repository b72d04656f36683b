import dataclasses
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from fusionrec.core.errors import ConfigError
from fusionrec.core.keys import Keys
from fusionrec.core.settings import DECAY_HORIZON_S, DECAY_MAX_EXPONENT, Settings, StateSettings, masked_url
from fusionrec.streams.state import Decay


def test_reads_prefixed_environment_and_types():
    s = Settings.from_env({"FUSIONREC_BATCH_SIZE": "123", "FUSIONREC_BATCH_TIMEOUT_S": "0.5",
                           "FUSIONREC_KAFKA_BOOTSTRAP": "k:9092",
                           "FUSIONREC_KAFKA_OPTIONS": '{"security.protocol": "SASL_SSL", "sasl.password": "pw"}'})
    assert (s.stream.batch_size, s.stream.batch_timeout_s, s.kafka.bootstrap) == (123, 0.5, "k:9092")
    assert s.kafka.options["security.protocol"] == "SASL_SSL"
    assert not s.embedded_kafka and s.embedded_redis
    assert s.effective_session_timeout_ms() == 45_000


def test_overrides_win_and_settings_are_frozen():
    s = Settings.from_env({"FUSIONREC_BATCH_SIZE": "5"}, batch_size=7)
    assert s.stream.batch_size == 7
    with pytest.raises(AttributeError):
        s.stream.batch_size = 9  # type: ignore[misc]


@pytest.mark.parametrize("env", [{"FUSIONREC_BATCH_SIZE": "many"}, {"FUSIONREC_BATCH_SIZE": "0"},
                                 {"FUSIONREC_KAFKA_OPTIONS": "[1, 2]"}, {"FUSIONREC_REDIS_PREFIX": "a{b}"},
                                 {"FUSIONREC_REDIS_PERSISTENCE": "rdb"}, {"FUSIONREC_REC_NICE": "20"},
                                 {"FUSIONREC_REC_NICE": "-1"}])
def test_bad_values_are_clear_errors(env):
    with pytest.raises(ConfigError, match="FUSIONREC_"):
        Settings.from_env(env)


def test_groups_round_trip_through_the_environment_and_unknown_names_are_errors():
    s = Settings.from_env({}, rec_k=7, kafka_options={"acks": "all"}, learn_vectors=False, serve_token="t" * 16)
    assert (s.rec.k, s.kafka.options, s.learn.vectors, s.serve.token) == (7, {"acks": "all"}, False, "t" * 16)
    assert Settings.from_env(s.to_env()) == s
    assert {env for _, f in Settings.fields() for env in [f.metadata["env"]]} == {
        k.removeprefix("FUSIONREC_") for k in Settings().to_env()} | {"KAFKA_BOOTSTRAP", "REDIS_URL",
                                                                      "SESSION_TIMEOUT_MS", "USER_ID_KEY",
                                                                      "EMBED_MODEL_PATH", "EMBED_MODEL_ID",
                                                                      "EMBED_EXPORT_DIR", "SERVE_TOKEN", "MODEL_KEY"}
    with pytest.raises(ConfigError, match="FUSIONREC_REC_KK"):
        s.replace(rec_kk=3)


def test_secrets_are_masked():
    s = Settings.from_env({"FUSIONREC_REDIS_URL": "redis://user:hunter2@host:6379/0",
                           "FUSIONREC_KAFKA_OPTIONS": '{"sasl.password": "hunter2", "acks": "all"}',
                           "FUSIONREC_MODEL_KEY": "hunter2-hunter2-hunter2"})
    masked = s.masked()
    assert "hunter2" not in repr(masked)
    assert masked["kafka"]["options"]["acks"] == "all"
    assert masked["redis"]["url"].endswith("@host:6379/0")
    in_query = Settings.from_env({"FUSIONREC_REDIS_URL": "redis://host:6379/0?password=hunter2&db=1&username=ops"})
    assert in_query.masked()["redis"]["url"] == "redis://host:6379/0?password=***&db=1&username=***"
    assert masked_url("redis+cluster://a:1,b:2?Token=hunter2") == "redis+cluster://a:1,b:2?Token=***"
    assert masked_url("redis://host:6379/0?db=2") == "redis://host:6379/0?db=2"


def test_user_keys_share_one_cluster_slot_and_buckets_are_stable():
    keys = Keys("fr", buckets=64)
    tags = {k.split("}")[0] for k in [keys.user_state("42"), keys.user_rec("42"), keys.user_profile("42"),
                                      keys.user_guard(keys.bucket("42"))]}
    assert len(tags) == 1
    assert keys.bucket("42") == Keys("other", buckets=64).bucket("42")
    assert keys.item_covis("7").startswith(keys.item_tag(keys.bucket("7")))
    assert len({keys.bucket(str(i)) for i in range(5000)}) == 64


NOW = 1_800_000_000_000  # 2027-01-15
WEEK_MS = 7 * 86_400_000


def at(now_ms: int, **changes) -> None:
    """Validate settings with ``changes`` to the state group as if the clock read ``now_ms``."""
    groups = {"state": dataclasses.replace(StateSettings(), **changes)}
    dataclasses.replace(Settings(), **groups).validate(now_ms=now_ms)


def test_future_skew_is_minutes_and_the_shipped_landmark_is_good_for_ten_years_from_today():
    assert Settings().contract.max_future_skew_s == 300
    Settings().validate()  # on the wall clock
    with pytest.raises(ConfigError, match="MAX_FUTURE_SKEW_S"):
        Settings.from_env({"FUSIONREC_MAX_FUTURE_SKEW_S": "-1"})


def test_decay_weights_are_exact_and_capped_instead_of_overflowing():
    decay = Decay(epoch_ms=0, half_life_s=60)
    assert (decay.weight(3.0, 120_000), decay.weight(3.0, 0), decay.weight(3.0, -60_000)) == (12.0, 3.0, 1.5)
    assert decay.weight(2.0, 10**15) == 2.0 * math.exp(DECAY_MAX_EXPONENT)  # math.exp alone raises OverflowError
    assert decay.weight(2.0, -(10**15)) == 0.0
    assert DECAY_MAX_EXPONENT < 709.78 - 100  # room for sums of weights, and exp(-cap) a normal float
    # the ranker brings a weight to decision time with weight(1, -ts) from the negated landmark
    written, at_decision = Decay(1_000, 60).weight(1.0, 61_000), Decay(-1_000, 60).weight(1.0, -121_000)
    assert (written, at_decision, written * at_decision) == (2.0, 0.25, 0.5)


def test_a_landmark_whose_weights_overflow_within_ten_years_is_refused_with_the_way_out():
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"FUSIONREC_DECAY_EPOCH_MS": "1483228800000"})  # 2017: overflows in 2036
    message = str(caught.value)
    assert "FUSIONREC_DECAY_EPOCH_MS=1483228800000" in message and "FUSIONREC_POPULARITY_HALF_LIFE_S" in message
    assert "move FUSIONREC_DECAY_EPOCH_MS forward" in message and "lengthen the half-life" in message
    with pytest.raises(ConfigError, match="FUSIONREC_AFFINITY_HALF_LIFE_S=60"):
        Settings.from_env({"FUSIONREC_AFFINITY_HALF_LIFE_S": "60"})  # one minute: the cap 14 hours after the landmark


def test_the_decay_horizon_edge_is_ten_years_at_the_limit_exponent():
    # the landmark whose weights reach exp(DECAY_MAX_EXPONENT) exactly ten years after NOW, at a 7-day half-life
    edge = NOW + DECAY_HORIZON_S * 1000 - DECAY_MAX_EXPONENT / math.log(2) * WEEK_MS
    at(NOW, decay_epoch_ms=math.ceil(edge) + 1, popularity_half_life_s=WEEK_MS / 1000)
    with pytest.raises(ConfigError, match="FUSIONREC_POPULARITY_HALF_LIFE_S=604800"):
        at(NOW, decay_epoch_ms=math.floor(edge) - 1, popularity_half_life_s=WEEK_MS / 1000)


@given(epoch_ms=st.integers(min_value=0, max_value=NOW), half_life_s=st.floats(min_value=1.0, max_value=1e10))
def test_settings_that_validate_leave_every_event_within_the_horizon_under_the_cap(epoch_ms, half_life_s):
    try:
        at(NOW, decay_epoch_ms=epoch_ms, popularity_half_life_s=half_life_s)
    except ConfigError:
        return
    latest = NOW + DECAY_HORIZON_S * 1000  # later than any event the contract lets through for ten years
    decay = Decay(epoch_ms, half_life_s)
    exponent = math.log(2) * (latest - epoch_ms) / (half_life_s * 1000)
    assert exponent <= DECAY_MAX_EXPONENT
    assert decay.weight(8.0, latest) == pytest.approx(8.0 * math.exp(exponent), rel=1e-9)


@pytest.mark.parametrize("env", [
    {"FUSIONREC_SERVE_TOKEN": "CHANGE-ME-to-32-random-characters"},
    {"FUSIONREC_REDIS_URL": "rediss+cluster://fusionrec:CHANGE-ME@redis-cluster:6379/0"},
    {"FUSIONREC_KAFKA_OPTIONS": '{"sasl.username": "fusionrec", "sasl.password": "CHANGE-ME"}'},
    {"FUSIONREC_MODEL_KEY": "change-me-please-0123456789"},
])
def test_the_example_manifests_placeholders_are_refused(env):
    with pytest.raises(ConfigError, match="placeholder CHANGE-ME"):
        Settings.from_env(env)


def test_the_committed_kubernetes_secret_does_not_validate_as_it_is():
    docs = list(yaml.safe_load_all((Path(__file__).parents[2] / "deploy/k8s/config.yaml").read_text()))
    secret = next(d for d in docs if d and d.get("kind") == "Secret")
    values = {**secret.get("stringData", {}), **secret.get("data", {})}
    assert "FUSIONREC_SERVE_TOKEN" in values
    with pytest.raises(ConfigError, match="placeholder"):
        Settings.from_env(values)


def test_thread_counts_are_not_negative():
    assert (Settings().rec.threads, Settings().learn.threads) == (1, 0)
    for name in ("FUSIONREC_REC_THREADS", "FUSIONREC_LEARN_THREADS"):
        with pytest.raises(ConfigError, match=name):
            Settings.from_env({name: "-1"})
