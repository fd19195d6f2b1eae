"""post formats: carousel, story and reel posts and their ordered stills

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06
"""
from alembic import op
import sqlalchemy as sa


revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Every existing post is a single feed image.
    op.add_column('posts', sa.Column('format', sa.String(length=16), server_default='feed', nullable=False))
    op.add_column('posts', sa.Column('format_options', sa.JSON(), nullable=True))
    op.create_table(
        'post_items',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('post_id', sa.Integer(), nullable=False),
        sa.Column('position', sa.Integer(), nullable=False),
        sa.Column('candidate_id', sa.Integer(), nullable=True),
        sa.Column('library_item_id', sa.Integer(), nullable=True),
        sa.Column('source_path', sa.Text(), nullable=False),
        sa.Column('crop', sa.JSON(), nullable=False),
        sa.Column('media_path', sa.Text(), nullable=True),
        sa.Column('media_sha256', sa.String(length=64), nullable=True),
        sa.Column('container_id', sa.String(length=200), nullable=True),
        sa.Column('container_created_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['candidate_id'], ['candidates.id'], name=op.f('fk_post_items_candidate_id_candidates'),
                                ondelete='RESTRICT'),
        sa.ForeignKeyConstraint(['library_item_id'], ['library_items.id'],
                                name=op.f('fk_post_items_library_item_id_library_items'), ondelete='SET NULL'),
        sa.ForeignKeyConstraint(['post_id'], ['posts.id'], name=op.f('fk_post_items_post_id_posts'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_post_items')),
        sa.UniqueConstraint('post_id', 'position', name=op.f('uq_post_items_post_id_position')),
    )
    with op.batch_alter_table('post_items', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_post_items_post_id'), ['post_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('post_items', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_post_items_post_id'))
    op.drop_table('post_items')
    with op.batch_alter_table('posts', schema=None) as batch_op:
        batch_op.drop_column('format_options')
        batch_op.drop_column('format')
