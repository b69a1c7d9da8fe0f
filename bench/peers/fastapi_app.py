"""The peer a team would otherwise pick: FastAPI + uvicorn + SQLAlchemy 2 async ORM (asyncpg).

Written the way the FastAPI and SQLAlchemy docs teach it, not tuned: a declarative mapped
model, an `AsyncSession` per request through `Depends`, pydantic response models. Same routes
and JSON shape as Surge; the tenant comes from the `X-Tenant` header like the baseline's.
uvicorn runs on uvloop, with httptools when it is installed (else h11).

    python -m bench.peers.fastapi_app --port 8203
"""

from __future__ import annotations

import argparse
import base64
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any

import uvicorn
from fastapi import Depends, FastAPI, Header, HTTPException, Query
from pydantic import BaseModel, ConfigDict, Field, PlainSerializer
from sqlalchemy import BigInteger, DateTime, Identity, Text, select
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from bench.common import DATABASE_URL, EVENTS_TABLE, format_ts


def _sqlalchemy_url(dsn: str) -> str:
    return dsn.replace("postgresql://", "postgresql+asyncpg://", 1)


# The same pool size as the baseline and Surge; no overflow, so the limit is the same too.
engine = create_async_engine(_sqlalchemy_url(DATABASE_URL), pool_size=16, max_overflow=0)
SessionLocal = async_sessionmaker(engine, expire_on_commit=False)


class Base(DeclarativeBase):
    pass


class User(Base):
    # Only the columns the API shows are mapped (password_hash is not), so the ORM selects
    # the same columns as Surge's get_user statement.
    __tablename__ = "users"

    tenant_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    email: Mapped[str]
    username: Mapped[str]
    status: Mapped[str]
    roles: Mapped[list[str]] = mapped_column(ARRAY(Text))
    profile: Mapped[dict[str, Any]] = mapped_column(JSONB)
    version: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Event(Base):
    __tablename__ = EVENTS_TABLE

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    tenant_id: Mapped[uuid.UUID]
    name: Mapped[str]
    ts: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    user_id: Mapped[uuid.UUID | None]
    props: Mapped[dict[str, Any]] = mapped_column(JSONB)


Timestamp = Annotated[datetime, PlainSerializer(format_ts, return_type=str)]


class UserOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    tenant_id: uuid.UUID
    email: str
    username: str
    status: str
    roles: list[str]
    profile: dict[str, Any]
    version: int
    created_at: Timestamp
    updated_at: Timestamp


class UserPage(BaseModel):
    items: list[UserOut]
    next_cursor: str | None


class EventIn(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    ts: datetime | None = None
    user_id: uuid.UUID | None = None
    props: dict[str, Any] = Field(default_factory=dict)


class EventBatch(BaseModel):
    events: list[EventIn] = Field(min_length=1, max_length=1000)


class Accepted(BaseModel):
    accepted: int


async def get_session() -> AsyncIterator[AsyncSession]:
    async with SessionLocal() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]
TenantDep = Annotated[uuid.UUID, Header(alias="X-Tenant")]


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    await engine.dispose()


app = FastAPI(lifespan=lifespan)


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/v1/users/{user_id}", response_model=UserOut)
async def get_user(user_id: uuid.UUID, tenant_id: TenantDep, session: SessionDep) -> User:
    user = await session.scalar(select(User).where(User.tenant_id == tenant_id, User.id == user_id))
    if user is None:
        raise HTTPException(status_code=404, detail="no such user")
    return user


@app.get("/v1/users", response_model=UserPage)
async def list_users(
    tenant_id: TenantDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> UserPage:
    result = await session.scalars(
        select(User)
        .where(User.tenant_id == tenant_id, User.status != "deleted")
        .order_by(User.id)
        .limit(limit + 1)
    )
    users = list(result)
    next_cursor = None
    if len(users) > limit:
        next_cursor = base64.urlsafe_b64encode(users[limit - 1].id.bytes).rstrip(b"=").decode()
    return UserPage(
        items=[UserOut.model_validate(u) for u in users[:limit]], next_cursor=next_cursor
    )


@app.post("/v1/events", status_code=202, response_model=Accepted)
async def post_events(batch: EventBatch, tenant_id: TenantDep, session: SessionDep) -> Accepted:
    now = datetime.now(UTC)
    session.add_all(
        [
            Event(
                tenant_id=tenant_id, name=e.name, ts=e.ts or now, user_id=e.user_id, props=e.props
            )
            for e in batch.events
        ]
    )
    await session.commit()
    return Accepted(accepted=len(batch.events))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peers.fastapi_app", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8203)
    args = parser.parse_args(argv)
    # http="auto" is uvicorn's default: httptools when importable, h11 otherwise.
    uvicorn.run(
        app, host=args.host, port=args.port, loop="uvloop", access_log=False, log_level="warning"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
