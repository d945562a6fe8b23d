import pytest
from fakes import Exploding, FakeEngine, FixedScores, WordReward
from prometheus_client import CollectorRegistry

from decoding.protocols import DecodeContext
from server.app import build_app
from server.scorers import ScorerRegistry
from server.serving import Runtime
from server.settings import Settings


def make_app(engine: FakeEngine | None = None, **overrides):
    engine = engine or FakeEngine()
    scorers = ScorerRegistry({"good_count": WordReward, "bad_count": lambda: WordReward("bad", "bad_count"),
                              "fixed": lambda: FixedScores([3, 1, 2, 0] * 16),
                              "exploding": Exploding}, None)
    settings = Settings(default_reward="good_count", max_n=16, max_choices=4,
                        max_tokens_limit=64, max_prompt_tokens=40, **overrides)
    runtime = Runtime(engine=engine, scorers=scorers, ctx=DecodeContext(engine), model_name="fake")
    return build_app(settings, runtime, registry=CollectorRegistry())


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(seed=11)


@pytest.fixture
async def client(engine):
    import httpx

    app = make_app(engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                                 base_url="http://test") as c:
        yield c
