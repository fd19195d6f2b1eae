"""content library and crash-safe publishing: library items, persistent clusters, gap reports, post
container/permalink/retry columns, per-call post attempts

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-21
"""
from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

LIVE_SLOT = "status NOT IN ('cancelled', 'abandoned')"


def upgrade() -> None:
    # Clusters become persistent rows with a stable key; membership moves to library_items.
    op.drop_index(op.f('ix_cluster_members_cluster_id'), table_name='cluster_members')
    op.drop_table('cluster_members')
    op.execute('DELETE FROM clusters')  # clusterings of the old schema are rebuilt by the next run
    with op.batch_alter_table('clusters') as batch:
        batch.add_column(sa.Column('key', sa.Integer(), nullable=False))
        batch.add_column(sa.Column('label_source', sa.String(length=40), nullable=False))
        batch.add_column(sa.Column('radius', sa.Float(), nullable=False))
        batch.add_column(sa.Column('active', sa.Boolean(), nullable=False))
        batch.add_column(sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False))
        batch.alter_column('version', existing_type=sa.String(length=64), nullable=True)
        batch.create_unique_constraint(op.f('uq_clusters_persona_id_key'), ['persona_id', 'key'])

    op.create_table('library_items',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('persona_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('candidate_id', sa.Integer(), nullable=True),
    sa.Column('source_photo_id', sa.Integer(), nullable=True),
    sa.Column('image_path', sa.Text(), nullable=False),
    sa.Column('image_sha256', sa.String(length=64), nullable=False),
    sa.Column('pillar_id', sa.Integer(), nullable=True),
    sa.Column('theme', sa.String(length=200), nullable=False),
    sa.Column('score', sa.Float(), nullable=True),
    sa.Column('caption', sa.Text(), nullable=False),
    sa.Column('embedding', sa.LargeBinary(), nullable=True),
    sa.Column('embedding_model', sa.String(length=200), nullable=True),
    sa.Column('cluster_id', sa.Integer(), nullable=True),
    sa.Column('cluster_distance', sa.Float(), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('used_by_post_id', sa.Integer(), nullable=True),
    sa.Column('used_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['persona_id'], ['personas.id'], name=op.f('fk_library_items_persona_id_personas'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['candidate_id'], ['candidates.id'], name=op.f('fk_library_items_candidate_id_candidates'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['source_photo_id'], ['source_photos.id'], name=op.f('fk_library_items_source_photo_id_source_photos'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['pillar_id'], ['content_pillars.id'], name=op.f('fk_library_items_pillar_id_content_pillars'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['cluster_id'], ['clusters.id'], name=op.f('fk_library_items_cluster_id_clusters'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_library_items')),
    sa.UniqueConstraint('persona_id', 'image_sha256', name=op.f('uq_library_items_persona_id_image_sha256')),
    sa.UniqueConstraint('candidate_id', name=op.f('uq_library_items_candidate_id')),
    sa.UniqueConstraint('source_photo_id', name=op.f('uq_library_items_source_photo_id')),
    )
    op.create_index(op.f('ix_library_items_persona_id'), 'library_items', ['persona_id'], unique=False)
    op.create_index(op.f('ix_library_items_cluster_id'), 'library_items', ['cluster_id'], unique=False)
    op.create_index(op.f('ix_library_items_status'), 'library_items', ['status'], unique=False)

    op.create_table('pillar_gap_reports',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('persona_id', sa.Integer(), nullable=False),
    sa.Column('today', sa.Date(), nullable=False),
    sa.Column('horizon_days', sa.Integer(), nullable=False),
    sa.Column('posts_per_week', sa.Float(), nullable=False),
    sa.Column('rows', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['persona_id'], ['personas.id'], name=op.f('fk_pillar_gap_reports_persona_id_personas'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_pillar_gap_reports')),
    )
    op.create_index(op.f('ix_pillar_gap_reports_persona_id'), 'pillar_gap_reports', ['persona_id'], unique=False)

    with op.batch_alter_table('posts') as batch:
        batch.alter_column('candidate_id', existing_type=sa.Integer(), nullable=True)
        batch.add_column(sa.Column('retryable', sa.Boolean(), nullable=False, server_default=sa.true()))
        batch.add_column(sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column('library_item_id', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('theme', sa.String(length=200), nullable=False, server_default=''))
        batch.add_column(sa.Column('caption_source', sa.String(length=120), nullable=True))
        batch.add_column(sa.Column('strategy_note', sa.Text(), nullable=True))
        batch.add_column(sa.Column('media_url', sa.Text(), nullable=True))
        batch.add_column(sa.Column('media_sha256', sa.String(length=64), nullable=True))
        batch.add_column(sa.Column('container_id', sa.String(length=200), nullable=True))
        batch.add_column(sa.Column('container_created_at', sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column('permalink', sa.Text(), nullable=True))
        batch.add_column(sa.Column('claimed_by', sa.String(length=64), nullable=True))
        batch.add_column(sa.Column('claimed_at', sa.DateTime(timezone=True), nullable=True))
        batch.create_foreign_key(op.f('fk_posts_library_item_id_library_items'), 'library_items', ['library_item_id'], ['id'],
                                 ondelete='SET NULL')
        # A cancelled or abandoned post frees its slot: only live posts are unique per account and slot.
        batch.drop_constraint('uq_posts_account_scheduled_at', type_='unique')
    op.create_index('uq_posts_account_scheduled_at', 'posts', ['account', 'scheduled_at'], unique=True,
                    sqlite_where=sa.text(LIVE_SLOT), postgresql_where=sa.text(LIVE_SLOT))
    with op.batch_alter_table('library_items') as batch:
        batch.create_foreign_key(op.f('fk_library_items_used_by_post_id_posts'), 'posts', ['used_by_post_id'], ['id'],
                                 ondelete='SET NULL')
    with op.batch_alter_table('post_attempts') as batch:
        batch.add_column(sa.Column('step', sa.String(length=16), nullable=True))
        batch.add_column(sa.Column('container_id', sa.String(length=200), nullable=True))
        batch.add_column(sa.Column('http_status', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('error_code', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('error_subcode', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('post_attempts') as batch:
        for column in ('error_subcode', 'error_code', 'http_status', 'container_id', 'step'):
            batch.drop_column(column)
    with op.batch_alter_table('library_items') as batch:
        batch.drop_constraint(op.f('fk_library_items_used_by_post_id_posts'), type_='foreignkey')
    op.drop_index('uq_posts_account_scheduled_at', table_name='posts')
    with op.batch_alter_table('posts') as batch:
        batch.create_unique_constraint('uq_posts_account_scheduled_at', ['account', 'scheduled_at'])
        batch.drop_constraint(op.f('fk_posts_library_item_id_library_items'), type_='foreignkey')
        for column in ('claimed_at', 'claimed_by', 'permalink', 'container_created_at', 'container_id', 'media_sha256',
                       'media_url', 'strategy_note', 'caption_source', 'theme', 'library_item_id', 'next_attempt_at',
                       'retryable'):
            batch.drop_column(column)
        batch.alter_column('candidate_id', existing_type=sa.Integer(), nullable=False)
    op.drop_index(op.f('ix_pillar_gap_reports_persona_id'), table_name='pillar_gap_reports')
    op.drop_table('pillar_gap_reports')
    op.drop_index(op.f('ix_library_items_status'), table_name='library_items')
    op.drop_index(op.f('ix_library_items_cluster_id'), table_name='library_items')
    op.drop_index(op.f('ix_library_items_persona_id'), table_name='library_items')
    op.drop_table('library_items')
    op.execute('DELETE FROM clusters')
    with op.batch_alter_table('clusters') as batch:
        batch.drop_constraint(op.f('uq_clusters_persona_id_key'), type_='unique')
        batch.alter_column('version', existing_type=sa.String(length=64), nullable=False)
        for column in ('updated_at', 'active', 'radius', 'label_source', 'key'):
            batch.drop_column(column)
    op.create_table('cluster_members',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('cluster_id', sa.Integer(), nullable=False),
    sa.Column('candidate_id', sa.Integer(), nullable=False),
    sa.Column('distance', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['candidate_id'], ['candidates.id'], name=op.f('fk_cluster_members_candidate_id_candidates'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['cluster_id'], ['clusters.id'], name=op.f('fk_cluster_members_cluster_id_clusters'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_cluster_members')),
    sa.UniqueConstraint('cluster_id', 'candidate_id', name=op.f('uq_cluster_members_cluster_id_candidate_id')),
    )
    op.create_index(op.f('ix_cluster_members_cluster_id'), 'cluster_members', ['cluster_id'], unique=False)
