"""review form: one vote per pair offer, and when the page showed the offer

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05
"""
from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('pair_offers') as batch:
        batch.add_column(sa.Column('shown_at', sa.DateTime(timezone=True), nullable=True))
    # Offers made before this revision were answerable as soon as they were made.
    op.execute("UPDATE pair_offers SET shown_at = created_at")
    op.create_index(op.f('ix_votes_offer_id'), 'votes', ['offer_id'], unique=True)


def downgrade() -> None:
    op.drop_index(op.f('ix_votes_offer_id'), table_name='votes')
    with op.batch_alter_table('pair_offers') as batch:
        batch.drop_column('shown_at')
