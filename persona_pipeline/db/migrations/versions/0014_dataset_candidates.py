"""dataset_candidates: images that may join a persona's dataset (edits, winners, posts) and their review

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07
"""
from alembic import op
import sqlalchemy as sa


revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('dataset_candidates',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('persona_id', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('origin', sa.String(length=16), nullable=False),
    sa.Column('source_photo_sha256', sa.String(length=64), nullable=True),
    sa.Column('instruction', sa.Text(), nullable=True),
    sa.Column('edit_model', sa.Text(), nullable=True),
    sa.Column('seed', sa.Integer(), nullable=True),
    sa.Column('candidate_id', sa.Integer(), nullable=True),
    sa.Column('post_id', sa.Integer(), nullable=True),
    sa.Column('image_path', sa.Text(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('caption', sa.Text(), nullable=False),
    sa.Column('identity_score', sa.Float(), nullable=True),
    sa.Column('identity_method', sa.String(length=200), nullable=True),
    sa.Column('nearest_sha256', sa.String(length=64), nullable=True),
    sa.Column('nearest_path', sa.Text(), nullable=True),
    sa.Column('nearest_cosine', sa.Float(), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('decided_by', sa.String(length=80), nullable=True),
    sa.Column('decided_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('dataset_version', sa.String(length=64), nullable=True),
    sa.CheckConstraint("origin IN ('edit', 'winner', 'post')", name=op.f('ck_dataset_candidates_origin_kind')),
    sa.CheckConstraint("status IN ('pending', 'accepted', 'rejected', 'dropped')", name=op.f('ck_dataset_candidates_status_kind')),
    sa.ForeignKeyConstraint(['candidate_id'], ['candidates.id'], name=op.f('fk_dataset_candidates_candidate_id_candidates'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['persona_id'], ['personas.id'], name=op.f('fk_dataset_candidates_persona_id_personas'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['post_id'], ['posts.id'], name=op.f('fk_dataset_candidates_post_id_posts'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_dataset_candidates')),
    sa.UniqueConstraint('persona_id', 'sha256', name=op.f('uq_dataset_candidates_persona_id_sha256'))
    )
    with op.batch_alter_table('dataset_candidates', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_dataset_candidates_persona_id'), ['persona_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_dataset_candidates_status'), ['status'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('dataset_candidates', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_dataset_candidates_status'))
        batch_op.drop_index(batch_op.f('ix_dataset_candidates_persona_id'))
    op.drop_table('dataset_candidates')
