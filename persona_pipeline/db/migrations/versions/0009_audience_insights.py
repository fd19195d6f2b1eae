"""insights: post insights time series, reading state, account daily insights

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""
from alembic import op
import sqlalchemy as sa


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Insights are a time series keyed by (post, metric, age): a rerun rewrites its own reading,
    # never adds a second one (docs/insights.md).
    op.create_table('account_insights',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('account', sa.String(length=120), nullable=False),
    sa.Column('day', sa.Date(), nullable=False),
    sa.Column('metric', sa.String(length=40), nullable=False),
    sa.Column('value', sa.Float(), nullable=False),
    sa.Column('read_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('simulated', sa.Boolean(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_account_insights')),
    sa.UniqueConstraint('account', 'day', 'metric', name=op.f('uq_account_insights_account_day_metric'))
    )
    with op.batch_alter_table('account_insights', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_account_insights_account'), ['account'], unique=False)

    op.create_table('insight_polls',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('post_id', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('last_age_hours', sa.Integer(), nullable=True),
    sa.Column('note', sa.Text(), nullable=True),
    sa.Column('followers_at_publish', sa.Float(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['post_id'], ['posts.id'], name=op.f('fk_insight_polls_post_id_posts'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_insight_polls')),
    sa.UniqueConstraint('post_id', name=op.f('uq_insight_polls_post_id'))
    )
    with op.batch_alter_table('insight_polls', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_insight_polls_status'), ['status'], unique=False)

    op.create_table('post_insights',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('post_id', sa.Integer(), nullable=False),
    sa.Column('metric', sa.String(length=40), nullable=False),
    sa.Column('age_hours', sa.Integer(), nullable=False),
    sa.Column('value', sa.Integer(), nullable=False),
    sa.Column('read_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('simulated', sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(['post_id'], ['posts.id'], name=op.f('fk_post_insights_post_id_posts'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_post_insights')),
    sa.UniqueConstraint('post_id', 'metric', 'age_hours', name=op.f('uq_post_insights_post_id_metric_age_hours'))
    )
    with op.batch_alter_table('post_insights', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_post_insights_post_id'), ['post_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('post_insights', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_post_insights_post_id'))

    op.drop_table('post_insights')
    with op.batch_alter_table('insight_polls', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_insight_polls_status'))

    op.drop_table('insight_polls')
    with op.batch_alter_table('account_insights', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_account_insights_account'))

    op.drop_table('account_insights')
