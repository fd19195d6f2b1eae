"""captions per photo, and the LoRA library's persona, version, origin, family and key format

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('photo_captions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('persona_id', sa.Integer(), nullable=False),
    sa.Column('pixel_sha256', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('caption', sa.Text(), nullable=False),
    sa.Column('captioner', sa.String(length=120), nullable=False),
    sa.Column('fields', sa.JSON(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['persona_id'], ['personas.id'], name=op.f('fk_photo_captions_persona_id_personas'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_photo_captions')),
    sa.UniqueConstraint('persona_id', 'pixel_sha256', 'kind', name=op.f('uq_photo_captions_persona_id_pixel_sha256_kind'))
    )
    op.create_index(op.f('ix_photo_captions_persona_id'), 'photo_captions', ['persona_id'], unique=False)
    # batch mode: SQLite cannot add a foreign key to an existing table in place.
    with op.batch_alter_table('lora_models') as batch:
        batch.add_column(sa.Column('persona_id', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('version', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('origin', sa.String(length=16), nullable=False, server_default='trained'))
        batch.add_column(sa.Column('family', sa.String(length=32), nullable=True))
        batch.add_column(sa.Column('key_format', sa.String(length=32), nullable=True))
        batch.create_foreign_key(op.f('fk_lora_models_persona_id_personas'), 'personas', ['persona_id'], ['id'], ondelete='SET NULL')
        batch.create_index(op.f('ix_lora_models_persona_id'), ['persona_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('lora_models') as batch:
        batch.drop_index(op.f('ix_lora_models_persona_id'))
        batch.drop_constraint(op.f('fk_lora_models_persona_id_personas'), type_='foreignkey')
        for column in ('key_format', 'family', 'origin', 'version', 'persona_id'):
            batch.drop_column(column)
    op.drop_index(op.f('ix_photo_captions_persona_id'), table_name='photo_captions')
    op.drop_table('photo_captions')
