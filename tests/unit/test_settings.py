import pytest

from fusionrec.core.errors import ConfigError
from fusionrec.core.keys import Keys
from fusionrec.core.settings import Settings, masked_url


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
                                 {"FUSIONREC_REDIS_PERSISTENCE": "rdb"}])
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
    tags = {k.split("}")[0] for k in [*keys.user_keys("42"), keys.user_rec("42")]}
    assert len(tags) == 1
    assert keys.bucket("42") == Keys("other", buckets=64).bucket("42")
    assert keys.item_covis("7").startswith(keys.item_tag(keys.bucket("7")))
    assert len({keys.bucket(str(i)) for i in range(5000)}) == 64
