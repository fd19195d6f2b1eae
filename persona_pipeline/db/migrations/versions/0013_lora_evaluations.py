"""lora_evaluations: each LoRA version's scores on the persona's fixed evaluation set

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06
"""
from alembic import op
import sqlalchemy as sa


revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('lora_evaluations',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('persona_id', sa.Integer(), nullable=False),
    sa.Column('lora_id', sa.Integer(), nullable=False),
    sa.Column('eval_key', sa.String(length=64), nullable=False),
    sa.Column('identity_method', sa.String(length=200), nullable=False),
    sa.Column('identity_mean', sa.Float(), nullable=False),
    sa.Column('identity_std', sa.Float(), nullable=False),
    sa.Column('alignment', sa.Float(), nullable=False),
    sa.Column('diversity', sa.Float(), nullable=False),
    sa.Column('no_face', sa.Integer(), nullable=False),
    sa.Column('renders', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['lora_id'], ['lora_models.id'], name=op.f('fk_lora_evaluations_lora_id_lora_models'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['persona_id'], ['personas.id'], name=op.f('fk_lora_evaluations_persona_id_personas'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_lora_evaluations')),
    sa.UniqueConstraint('lora_id', 'eval_key', name=op.f('uq_lora_evaluations_lora_id_eval_key'))
    )
    with op.batch_alter_table('lora_evaluations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_lora_evaluations_lora_id'), ['lora_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_lora_evaluations_persona_id'), ['persona_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('lora_evaluations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_lora_evaluations_persona_id'))
        batch_op.drop_index(batch_op.f('ix_lora_evaluations_lora_id'))
    op.drop_table('lora_evaluations')
