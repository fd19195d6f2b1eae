"""votes: a pair may be voted more than once (one vote per offer still holds)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05
"""
from alembic import op


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Pair selection asks a close pair at the top-K boundary again (domain/pairing.py): its second
    # and third votes are what settles the order. Duplicates of one answer are refused by the unique
    # offer key (0007), not by the pair.
    with op.batch_alter_table('votes') as batch:
        batch.drop_constraint(op.f('uq_votes_pair_low_id_pair_high_id'), type_='unique')
        batch.create_index(batch.f('ix_votes_pair_low_id'), ['pair_low_id', 'pair_high_id'], unique=False)


def downgrade() -> None:
    # Fails if a pair has more than one vote: which to keep is not the schema's decision.
    with op.batch_alter_table('votes') as batch:
        batch.drop_index(batch.f('ix_votes_pair_low_id'))
        batch.create_unique_constraint(op.f('uq_votes_pair_low_id_pair_high_id'), ['pair_low_id', 'pair_high_id'])
