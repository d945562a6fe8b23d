import pytest
from fakes import FakeEngine, make_app


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
