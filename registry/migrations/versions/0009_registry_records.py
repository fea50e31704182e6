"""the registry as a system of record: owners, zones, communities, vehicle and case
details, search keys, database constraints

Owners move out of `vehicles` into `owners` (one row per distinct name and phone).

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

from registry.normalize import phone_key, plate_key

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "zones",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_zones")),
    )
    op.create_table(
        "communities",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_communities")),
    )
    op.create_table(
        "owners",
        sa.Column("id", _ID, nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("phone", sa.String(length=40), nullable=False),
        sa.Column("phone_key", sa.String(length=40), nullable=False),
        sa.Column("id_number", sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_owners")),
    )
    op.create_index(op.f("ix_owners_phone_key"), "owners", ["phone_key"])
    op.create_index("uq_owners_id_number", "owners", ["id_number"], unique=True,
                    sqlite_where=sa.text("id_number <> ''"),
                    postgresql_where=sa.text("id_number <> ''"))
    op.execute("INSERT INTO zones (id, name) SELECT DISTINCT zone, '' FROM stations")

    with op.batch_alter_table("vehicles") as batch_op:
        batch_op.add_column(sa.Column("plate_key", sa.String(length=32), nullable=False,
                                      server_default=""))
        batch_op.add_column(sa.Column("frame_no", sa.String(length=32), nullable=False,
                                      server_default=""))
        batch_op.add_column(sa.Column("frame_key", sa.String(length=32), nullable=False,
                                      server_default=""))
        batch_op.add_column(sa.Column("model", sa.String(length=64), nullable=False,
                                      server_default=""))
        batch_op.add_column(sa.Column("registered_ms", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("community", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("owner_id", sa.BigInteger(), nullable=True))
    _move_owners()
    with op.batch_alter_table("vehicles") as batch_op:
        for column in ("plate_key", "frame_no", "frame_key", "model"):
            batch_op.alter_column(column, server_default=None)
        batch_op.drop_column("owner_name")
        batch_op.drop_column("owner_phone")
        batch_op.create_foreign_key(op.f("fk_vehicles_community_communities"), "communities",
                                    ["community"], ["id"])
        batch_op.create_foreign_key(op.f("fk_vehicles_owner_id_owners"), "owners",
                                    ["owner_id"], ["id"])
        batch_op.create_index(op.f("ix_vehicles_plate_key"), ["plate_key"])
        batch_op.create_index(op.f("ix_vehicles_frame_key"), ["frame_key"])
        batch_op.create_index(op.f("ix_vehicles_community"), ["community"])
        batch_op.create_index(op.f("ix_vehicles_owner_id"), ["owner_id"])

    with op.batch_alter_table("stations") as batch_op:
        batch_op.add_column(sa.Column("community", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("installed_ms", sa.BigInteger(), nullable=True))
        batch_op.create_foreign_key(op.f("fk_stations_community_communities"), "communities",
                                    ["community"], ["id"])
        batch_op.create_check_constraint(op.f("ck_stations_lat"),
                                         "lat IS NULL OR (lat >= -90 AND lat <= 90)")
        batch_op.create_check_constraint(op.f("ck_stations_lon"),
                                         "lon IS NULL OR (lon >= -180 AND lon <= 180)")

    with op.batch_alter_table("theft_cases") as batch_op:
        for column, length in (("place", 200), ("report_no", 64), ("police_unit", 100),
                               ("recovered_how", 200), ("notes", 2000)):
            batch_op.add_column(sa.Column(column, sa.String(length=length), nullable=False,
                                          server_default=""))
        batch_op.add_column(sa.Column("expires_ms", sa.BigInteger(), nullable=True))
        batch_op.create_check_constraint(op.f("ck_theft_cases_status"),
                                         "status IN ('open', 'recovered', 'cancelled')")
    with op.batch_alter_table("theft_cases") as batch_op:
        for column in ("place", "report_no", "police_unit", "recovered_how", "notes"):
            batch_op.alter_column(column, server_default=None)


def _move_owners() -> None:
    """One owner per distinct (name, phone) of the old vehicle rows; plates keyed."""
    conn = op.get_bind()
    rows = conn.execute(sa.text("SELECT tag, plate, owner_name, owner_phone FROM vehicles")
                        ).all()
    owners: dict[tuple[str, str], int] = {}
    for tag, plate, name, phone in rows:
        owner_id = None
        if name or phone:
            owner_id = owners.get((name, phone))
            if owner_id is None:
                owner_id = conn.execute(sa.text(
                    "INSERT INTO owners (name, phone, phone_key, id_number) "
                    "VALUES (:n, :p, :k, '') RETURNING id"),
                    {"n": name, "p": phone, "k": phone_key(phone)}).scalar_one()
                owners[name, phone] = owner_id
        conn.execute(sa.text("UPDATE vehicles SET owner_id = :o, plate_key = :k "
                             "WHERE tag = :t"), {"o": owner_id, "k": plate_key(plate), "t": tag})


def downgrade() -> None:
    with op.batch_alter_table("theft_cases") as batch_op:
        batch_op.drop_constraint(op.f("ck_theft_cases_status"), type_="check")
        for column in ("expires_ms", "notes", "recovered_how", "police_unit", "report_no",
                       "place"):
            batch_op.drop_column(column)
    with op.batch_alter_table("stations") as batch_op:
        batch_op.drop_constraint(op.f("ck_stations_lon"), type_="check")
        batch_op.drop_constraint(op.f("ck_stations_lat"), type_="check")
        batch_op.drop_constraint(op.f("fk_stations_community_communities"),
                                 type_="foreignkey")
        batch_op.drop_column("installed_ms")
        batch_op.drop_column("community")
    with op.batch_alter_table("vehicles") as batch_op:
        batch_op.add_column(sa.Column("owner_name", sa.String(length=200), nullable=False,
                                      server_default=""))
        batch_op.add_column(sa.Column("owner_phone", sa.String(length=40), nullable=False,
                                      server_default=""))
    op.execute("UPDATE vehicles SET owner_name = COALESCE((SELECT name FROM owners "
               "WHERE owners.id = vehicles.owner_id), ''), owner_phone = COALESCE(("
               "SELECT phone FROM owners WHERE owners.id = vehicles.owner_id), '')")
    with op.batch_alter_table("vehicles") as batch_op:
        for index in ("ix_vehicles_owner_id", "ix_vehicles_community", "ix_vehicles_frame_key",
                      "ix_vehicles_plate_key"):
            batch_op.drop_index(op.f(index))
        batch_op.drop_constraint(op.f("fk_vehicles_owner_id_owners"), type_="foreignkey")
        batch_op.drop_constraint(op.f("fk_vehicles_community_communities"),
                                 type_="foreignkey")
        for column in ("owner_id", "community", "registered_ms", "model", "frame_key",
                       "frame_no", "plate_key"):
            batch_op.drop_column(column)
    op.drop_index("uq_owners_id_number", "owners")
    op.drop_index(op.f("ix_owners_phone_key"), "owners")
    op.drop_table("owners")
    op.drop_table("communities")
    op.drop_table("zones")
