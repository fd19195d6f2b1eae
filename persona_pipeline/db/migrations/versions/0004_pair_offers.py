"""review form: pair offers with their selection probability, votes linked to offers, post review notes

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('pair_offers',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('step_id', sa.Integer(), nullable=False),
    sa.Column('left_id', sa.Integer(), nullable=False),
    sa.Column('right_id', sa.Integer(), nullable=False),
    sa.Column('probability', sa.Float(), nullable=False),
    sa.Column('strategy', sa.String(length=16), nullable=False),
    sa.Column('reviewer', sa.String(length=80), nullable=False),
    sa.Column('outcome', sa.String(length=16), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['step_id'], ['run_steps.id'], name=op.f('fk_pair_offers_step_id_run_steps'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['left_id'], ['candidates.id'], name=op.f('fk_pair_offers_left_id_candidates'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['right_id'], ['candidates.id'], name=op.f('fk_pair_offers_right_id_candidates'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_pair_offers'))
    )
    op.create_index(op.f('ix_pair_offers_step_id'), 'pair_offers', ['step_id'], unique=False)
    with op.batch_alter_table('votes') as batch:
        batch.add_column(sa.Column('offer_id', sa.Integer(), nullable=True))
        batch.create_foreign_key(op.f('fk_votes_offer_id_pair_offers'), 'pair_offers', ['offer_id'], ['id'], ondelete='SET NULL')
    with op.batch_alter_table('posts') as batch:
        batch.add_column(sa.Column('review_note', sa.Text(), nullable=True))
    # The review sensor reads events by id; the form's queue reads open steps by status.
    op.create_index('ix_run_steps_status', 'run_steps', ['status'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_run_steps_status', table_name='run_steps')
    with op.batch_alter_table('posts') as batch:
        batch.drop_column('review_note')
    with op.batch_alter_table('votes') as batch:
        batch.drop_constraint(op.f('fk_votes_offer_id_pair_offers'), type_='foreignkey')
        batch.drop_column('offer_id')
    op.drop_index(op.f('ix_pair_offers_step_id'), table_name='pair_offers')
    op.drop_table('pair_offers')
