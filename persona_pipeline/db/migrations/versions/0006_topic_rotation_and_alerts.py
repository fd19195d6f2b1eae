"""topic rotation state per persona pillar, and the alerts outbox

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-21
"""
from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('topic_rotation',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('persona_id', sa.Integer(), nullable=False),
    sa.Column('pillar_id', sa.Integer(), nullable=False),
    sa.Column('credit', sa.Float(), nullable=False),
    sa.Column('round', sa.Integer(), nullable=False),
    sa.Column('used_themes', sa.JSON(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['persona_id'], ['personas.id'], name=op.f('fk_topic_rotation_persona_id_personas'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['pillar_id'], ['content_pillars.id'], name=op.f('fk_topic_rotation_pillar_id_content_pillars'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_topic_rotation')),
    sa.UniqueConstraint('persona_id', 'pillar_id', name=op.f('uq_topic_rotation_persona_id_pillar_id')),
    )
    op.create_index(op.f('ix_topic_rotation_persona_id'), 'topic_rotation', ['persona_id'], unique=False)

    op.create_table('alerts',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('dedupe_key', sa.String(length=300), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('persona_slug', sa.String(length=64), nullable=True),
    sa.Column('subject', sa.String(length=200), nullable=False),
    sa.Column('run_id', sa.String(length=64), nullable=True),
    sa.Column('link', sa.Text(), nullable=True),
    sa.Column('text', sa.Text(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('resolved_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('sent_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_alerts')),
    sa.UniqueConstraint('dedupe_key', name=op.f('uq_alerts_dedupe_key')),
    )
    op.create_index(op.f('ix_alerts_persona_slug'), 'alerts', ['persona_slug'], unique=False)
    op.create_index(op.f('ix_alerts_status'), 'alerts', ['status'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_alerts_status'), table_name='alerts')
    op.drop_index(op.f('ix_alerts_persona_slug'), table_name='alerts')
    op.drop_table('alerts')
    op.drop_index(op.f('ix_topic_rotation_persona_id'), table_name='topic_rotation')
    op.drop_table('topic_rotation')
